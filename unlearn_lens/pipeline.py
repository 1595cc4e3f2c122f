"""The main job: every step for every comparison base -> NAME, resumable, then the report.

Each step is one ``unlearn-lens`` subcommand run in this process with the flags a user would
type, so the pipeline exercises exactly the documented commands. A step counts as done only
when its marker (``OUT/.pipeline/<step>.json``, written last) exists; ``force`` redoes it. A
failing step is named, the steps that need it are skipped, every independent step still runs,
and the next run resumes from what finished.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import click

from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_write_text
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.outputs import default_name

DEFAULT_BASE = ("base", "EleutherAI/deep-ignorance-unfiltered")
DEFAULT_MODELS = (("filtered", "EleutherAI/deep-ignorance-e2e-strong-filter"),
                  ("unlearned", "EleutherAI/deep-ignorance-unfiltered-cb-lat"))
STEP_KINDS = ("datasets", "capture", "params", "analyze", "lipschitz", "tuned-lens", "report")


@dataclass(frozen=True)
class ModelEntry:
    """A model of the study: a short name (folder names, tables) and where to load it from."""

    name: str
    spec: str
    revision: str | None = None

    @classmethod
    def parse(cls, value: str, revision: str | None = None) -> "ModelEntry":
        """``NAME=PATH_OR_ID`` (or a bare path/id, named after its last component)."""
        name, _, spec = value.partition("=") if "=" in value else ("", "", value)
        name = name or default_name(spec)
        outputs.check_model_name(name, "model name", " (NAME=PATH_OR_ID)")
        if not spec:
            raise UserError(f"{value!r}: expected NAME=PATH_OR_ID")
        return cls(name, spec, revision)


@dataclass
class PipelineSettings:
    """Everything a pipeline run needs; defaults follow each command's own defaults."""

    outdir: Path
    base: ModelEntry
    models: list[ModelEntry]
    data: Path | None = None
    device: str = "cpu"
    model_dtype: str = "auto"
    cache_dtype: str = "float16"
    max_samples: int = 500
    max_length: int = 512
    batch_size: int = 8
    force: bool = False
    skip: frozenset[str] = frozenset()
    empirical_rank: bool = False
    workers: int | None = None
    lipschitz_samples: int = 64
    lipschitz_eps: str = "1e-3,1e-2"
    tuned_lens_steps: int = 250
    tuned_lens_tokens: int = 512
    trust_remote_code: bool = False
    relearn: bool = False  # a relearning attack per modified model (`unlearn-lens relearn`)
    relearn_flags: tuple[str, ...] = ()  # extra `relearn` flags (the demo's short settings)
    attacks: bool = False  # the attacks per modified model (`unlearn-lens attack`)
    attack_max_samples: int | None = None  # texts / questions each attack evaluates on (default: max_samples)
    attack_options: dict = field(default_factory=dict)  # attack options (ATTACK_OPTIONS keys of the attack modules)
    extra_report: dict = field(default_factory=dict)

    def comparison_dir(self, name: str) -> Path:
        return outputs.comparison_dir(self.outdir, self.base.name, name)

    def cache(self, name: str) -> Path:
        return outputs.cache_path(self.outdir, name)

    @property
    def data_dir(self) -> Path:
        return self.data if self.data is not None else self.outdir / outputs.DATA


@dataclass
class Step:
    """One resumable unit of work: an id, the ids it needs, and what to run."""

    id: str
    run: Callable[[], None]
    needs: Sequence[str] = ()
    describe: str = ""


def run_command(argv: Sequence[str]) -> None:
    """Run one ``unlearn-lens`` subcommand in this process; a failure raises with its message."""
    from cli import group

    try:
        group.main(args=list(argv), prog_name="unlearn-lens", standalone_mode=False)
    except UserError:
        raise
    except click.ClickException as exc:
        raise UserError(exc.format_message()) from None
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise UserError(f"exited with status {exc.code}") from None


def _model_flags(entry: ModelEntry, settings: PipelineSettings, flag: str = "--model") -> list[str]:
    flags = [flag, entry.spec]
    if entry.revision:
        flags += ["--revision", entry.revision]
    return flags


def plan(settings: PipelineSettings) -> list[Step]:
    """The ordered steps of a run (datasets, captures, params, analyze, live diagnostics, relearn, attack)."""
    s = settings
    out = str(s.outdir)
    models = [s.base, *s.models]
    trust = ["--trust-remote-code"] if s.trust_remote_code else []
    steps: list[Step] = []
    if s.data is None:
        steps.append(Step("datasets", lambda: run_command(
            ["datasets", "create", "--outdir", str(s.data_dir)]), describe="WMDP-Bio and WikiText-2 from the hub"))
    data_need = () if s.data is not None else ("datasets",)
    for entry in models:
        argv = ["capture", *_model_flags(entry, s), "--data", str(s.data_dir), "--out", str(s.cache(entry.name)),
                "--max-samples", str(s.max_samples), "--max-length", str(s.max_length),
                "--batch-size", str(s.batch_size), "--dtype", s.cache_dtype, "--model-dtype", s.model_dtype,
                "--device", s.device, *trust, *(["--overwrite"] if s.force else [])]
        steps.append(Step(f"capture:{entry.name}", lambda a=argv: run_command(a), data_need))
    for entry in s.models:
        argv = ["params", "--model-a", s.base.spec, "--model-b", entry.spec, "--outdir", str(s.comparison_dir(entry.name)),
                *(["--revision-a", s.base.revision] if s.base.revision else []),
                *(["--revision-b", entry.revision] if entry.revision else []),
                *(["--empirical-rank"] if s.empirical_rank else []),
                *(["--workers", str(s.workers)] if s.workers else []), *(["--force"] if s.force else [])]
        steps.append(Step(f"params:{entry.name}", lambda a=argv: run_command(a)))
    analyze = ["analyze", "--base", str(s.cache(s.base.name)), "--base-name", s.base.name, "--outdir", out,
               *[x for e in s.models for x in ("--compare", f"{e.name}={s.cache(e.name)}")],
               *(["--workers", str(s.workers)] if s.workers else [])]
    steps.append(Step("analyze", lambda: run_command(analyze), [f"capture:{e.name}" for e in models]))
    for entry in s.models:
        argv = ["lipschitz", *_model_flags(s.base, s, "--model-a"), "--model-b", entry.spec,
                "--name-a", s.base.name, "--name-b", entry.name, "--data", str(s.data_dir), "--outdir", out,
                "--eps", s.lipschitz_eps, "--max-samples", str(s.lipschitz_samples),
                "--max-length", str(min(s.max_length, 128)), "--device", s.device, "--dtype", s.model_dtype,
                *(["--revision-b", entry.revision] if entry.revision else []), *trust,
                *(["--overwrite"] if s.force else [])]
        steps.append(Step(f"lipschitz:{entry.name}", lambda a=argv: run_command(a), data_need))
    for entry in models:
        argv = ["tuned-lens", *_model_flags(entry, s), "--name", entry.name, "--data", str(s.data_dir),
                "--outdir", out, "--steps", str(s.tuned_lens_steps),
                "--tokens-per-step", str(s.tuned_lens_tokens), "--cache", str(s.cache(entry.name)),
                "--device", s.device, "--dtype", s.model_dtype, *trust, *(["--overwrite"] if s.force else [])]
        steps.append(Step(f"tuned-lens:{entry.name}", lambda a=argv: run_command(a), [f"capture:{entry.name}"]))
    if s.relearn:
        for entry in s.models:
            argv = ["relearn", *_model_flags(entry, s), "--base-model", s.base.spec,
                    *(["--base-revision", s.base.revision] if s.base.revision else []), "--name", entry.name,
                    "--data", str(s.data_dir), "--outdir", out, "--max-samples", str(s.max_samples),
                    "--max-length", str(s.max_length), "--eval-batch-size", str(s.batch_size), "--device", s.device,
                    "--dtype", s.model_dtype, *s.relearn_flags, *trust, *(["--overwrite"] if s.force else [])]
            steps.append(Step(f"relearn:{entry.name}", lambda a=argv: run_command(a), data_need,
                              describe="fine-tuning attack: steps to recover half the gap to the base"))
    if s.attacks:
        for entry in s.models:
            steps.append(Step(f"attack:{entry.name}", lambda a=attack_argv(s, entry): run_command(a),
                              [*data_need, f"capture:{s.base.name}", f"capture:{entry.name}"],
                              describe="attacks: direction ablation, quantization, relearning controls"))
    return [step for step in steps if step.id.split(":")[0] not in s.skip]


#: How the `attack` command takes one attack option (repeatable): ``--option KEY=VALUE``.
ATTACK_OPTION_FLAG = "--option"


def _option_value(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def attack_argv(settings: PipelineSettings, entry: ModelEntry) -> list[str]:
    """`unlearn-lens attack` for base -> ``entry``: outputs in OUT/<name>/attacks, the pipeline's caches."""
    s = settings
    return ["attack", "--base", s.base.spec, "--model", entry.spec, "--name", entry.name,
            "--data", str(s.data_dir), "--outdir", str(s.outdir),
            "--cache-base", str(s.cache(s.base.name)), "--cache-model", str(s.cache(entry.name)),
            *(["--base-revision", s.base.revision] if s.base.revision else []),
            *(["--model-revision", entry.revision] if entry.revision else []),
            "--max-samples", str(s.attack_max_samples or s.max_samples), "--max-length", str(s.max_length),
            "--batch-size", str(s.batch_size), "--device", s.device, "--dtype", s.model_dtype,
            *[x for key, value in s.attack_options.items()
              for x in (ATTACK_OPTION_FLAG, f"{key}={_option_value(value)}")],
            *(["--trust-remote-code"] if s.trust_remote_code else []), *(["--force"] if s.force else [])]


def _marker(settings: PipelineSettings, step_id: str) -> Path:
    return outputs.pipeline_record(settings.outdir, step_id)


def _write_marker(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=2))


#: a hub id: ``name`` or ``owner/name`` (letters, digits, '-', '_', '.'), nothing that reads as a path
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether an offline run can load ``repo_id`` (its config.json is in the local hub cache)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def check_inputs(settings: PipelineSettings) -> None:
    """Stop in one line, before the first step, on a model that is neither a local path that exists
    nor a plausible hub id (nor, offline, in the hub cache), or on a missing data directory/file."""
    from unlearn_lens.data import FILES

    for entry in (settings.base, *settings.models):
        spec = os.path.expanduser(entry.spec)
        if os.path.exists(spec):
            continue
        if not _HUB_ID.match(entry.spec) or entry.spec.endswith(".gguf"):
            raise UserError(f"model {entry.name}: {entry.spec}: no such file or directory (and not a hub id)")
        if _offline() and not _in_hub_cache(entry.spec, entry.revision):
            raise UserError(f"model {entry.name}: {entry.spec}: no such local path, and HF_HUB_OFFLINE is set but "
                            "the hub cache does not hold it")
    if settings.data is not None:
        if not settings.data.is_dir():
            raise UserError(f"--data {settings.data}: no such directory")
        missing = [name for name in FILES.values() if not (settings.data / name).is_file()]
        if missing:
            raise UserError(f"--data {settings.data}: missing {', '.join(missing)}")


def run_pipeline(settings: PipelineSettings, echo: Callable[[str], None] = click.echo,
                 pre_steps: Sequence[Step] = ()) -> dict[str, str]:
    """Run every step not yet done; returns ``{step id: "done" | "skipped (done)" | "failed: ..." | ...}``.

    ``pre_steps`` (the demo makes its models there) are prerequisites of everything: the first
    one that fails stops the run.
    """
    settings.outdir.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    prerequisites = {step.id for step in pre_steps}
    steps = [*pre_steps, *plan(settings)]
    for number, step in enumerate(steps, start=1):
        marker = _marker(settings, step.id)
        prefix = f"[{number}/{len(steps)}] {step.id}"
        blocked = [need for need in step.needs if not status.get(need, "done").startswith(("done", "skipped"))]
        if blocked:
            status[step.id] = f"not run: needs {', '.join(blocked)}"
            echo(f"{prefix}: not run (needs {', '.join(blocked)})")
            continue
        if marker.is_file() and not settings.force:
            status[step.id] = "skipped (done)"
            echo(f"{prefix}: already done")
            continue
        marker.unlink(missing_ok=True)
        echo(f"{prefix}: running")
        started = time.time()
        try:
            step.run()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the run goes on
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            status[step.id] = f"failed: {message}"
            echo(f"{prefix}: FAILED: {message}")
            if os.environ.get("UNLEARN_LENS_DEBUG"):
                raise
            if step.id in prerequisites:
                raise UserError(f"step {step.id} failed: {message}; finished steps are kept, "
                                "rerun the same command to resume") from None
            continue
        _write_marker(marker, {"step": step.id, "seconds": round(time.time() - started, 1)})
        status[step.id] = "done"
        echo(f"{prefix}: done in {time.time() - started:.0f}s")
    if "report" not in settings.skip:
        from analyses.report import ReportInputs, write_report

        path = write_report(ReportInputs(settings.outdir, settings.base.name, [m.name for m in settings.models],
                                         steps=status, **settings.extra_report))
        status["report"] = "done"
        echo(f"report: {path}")
    return status
