"""The main job: every step for every comparison base -> NAME, resumable, then the report.

Each step is one command's Python run function called with its settings dataclass, the same one
the command builds from its flags (``run_eval(EvalSettings)``, ``run_lipschitz(LipschitzSettings)``
...); ``plan()`` builds every step's settings, so the policy the pipeline applies (the Lipschitz
step's shorter texts, the tuned lens's own defaults) is written there. A step counts as done only
when its marker (``OUT/.pipeline/<step>.json``, written last) exists; ``force`` redoes it. A
failing step is named, the steps that need it are skipped, every independent step still runs,
and the next run resumes from what finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click

from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_write_text
from unlearn_lens.core.environment import explain
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.identity import inputs_record
from unlearn_lens.core.outputs import default_name
from unlearn_lens.core.settings import (CACHE_DTYPES, CAPTURE_MAX_SAMPLES, DEFAULT_BATCH_SIZE, DEFAULT_DEVICE,
                                        DEFAULT_DTYPE, DEFAULT_MAX_LENGTH, SHORT_MAX_LENGTH, Compute, ModelRef)
from unlearn_lens.lipschitz import DEFAULT_EPS_TEXT, LIPSCHITZ_MAX_SAMPLES
from unlearn_lens.tuned_lens import TunedLensSettings

if TYPE_CHECKING:
    from analyses.activations.analyze_step import AnalyzeSettings
    from analyses.weights.params_step import ParamsSettings
    from unlearn_lens.attacks.base import AttackSettings
    from unlearn_lens.capture import CaptureRun
    from unlearn_lens.data import DatasetSettings
    from unlearn_lens.lipschitz import LipschitzSettings
    from unlearn_lens.relearn import RelearnSettings

DEFAULT_BASE = ("base", "EleutherAI/deep-ignorance-unfiltered")
DEFAULT_MODELS = (("filtered", "EleutherAI/deep-ignorance-e2e-strong-filter"),
                  ("unlearned", "EleutherAI/deep-ignorance-unfiltered-cb-lat"))
STEP_KINDS = ("datasets", "capture", "params", "analyze", "lipschitz", "tuned-lens", "report")
#: The Lipschitz step differentiates through the model for every text, draw and eps, so it reads at
#: most this many tokens per text (the `lipschitz` command's default) even when --max-length is longer.
LIPSCHITZ_MAX_LENGTH = SHORT_MAX_LENGTH


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
    device: str = DEFAULT_DEVICE
    model_dtype: str = DEFAULT_DTYPE
    cache_dtype: str = CACHE_DTYPES[0]
    max_samples: int = CAPTURE_MAX_SAMPLES  # texts (questions) per split each capture reads
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    force: bool = False
    skip: frozenset[str] = frozenset()
    empirical_rank: bool = False
    workers: int | None = None
    lipschitz_samples: int = LIPSCHITZ_MAX_SAMPLES
    lipschitz_eps: str = DEFAULT_EPS_TEXT
    lipschitz_options: dict = field(default_factory=dict)  # LipschitzSettings fields overridden (the demo's short run)
    tuned_lens_steps: int = TunedLensSettings.steps
    tuned_lens_tokens: int = TunedLensSettings.tokens_per_step
    trust_remote_code: bool = False
    relearn: bool = False  # a relearning attack per modified model (`unlearn-lens relearn`)
    relearn_options: dict = field(default_factory=dict)  # RelearnSettings fields overridden (the demo's short run)
    attacks: bool = False  # the attacks per modified model (`unlearn-lens attack`)
    attack_names: tuple[str, ...] = ()  # which attacks (default: every attack, the command's default)
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

    def model_ref(self, entry: ModelEntry) -> ModelRef:
        """``entry`` as the steps load it (the run's --trust-remote-code applies to every model)."""
        return ModelRef(entry.spec, entry.revision, trust_remote_code=self.trust_remote_code)


@dataclass
class Step:
    """One resumable unit of work: an id, the run function and its settings, and the ids it needs."""

    id: str
    function: Callable[[Any], object]
    settings: Any  # a settings dataclass: what ``function`` is called with
    needs: Sequence[str] = ()
    describe: str = ""
    models: Sequence[tuple[str, str, str | None]] = ()  # (role, spec, revision) of the models it reads
    data: str | None = None  # the data directory it reads
    caches: Sequence[str] = ()  # the caches it reads

    def run(self) -> None:
        """Call the step's run function with its settings."""
        self.function(self.settings)

    def inputs(self) -> dict:
        """What the step is made from (``core.identity``): the models' files, the data's content, the caches'
        recorded identities and its settings; a step whose record holds other inputs runs again."""
        from cache_store.identity import cache_identity

        return inputs_record(models=self.models, data=self.data, settings=self.settings,
                             caches={url: cache_identity(url) for url in self.caches} or None)


# --- the run function of each step (looked up when the plan is made) ---------------------------------

def datasets_step(settings: DatasetSettings) -> None:
    """The pipeline step of `datasets create`."""
    from unlearn_lens.data import run_datasets

    run_datasets(settings)


def capture_step(settings: CaptureRun) -> None:
    """The pipeline step of `capture`."""
    from unlearn_lens.capture import run_capture

    run_capture(settings)


def params_step(settings: ParamsSettings) -> None:
    """The pipeline step of `params`."""
    from analyses.weights.params_step import run_params_step

    run_params_step(settings)


def analyze_step(settings: AnalyzeSettings) -> None:
    """The pipeline step of `analyze`."""
    from analyses.activations.analyze_step import run_analyze

    run_analyze(settings)


def lipschitz_step(settings: LipschitzSettings) -> None:
    """The pipeline step of `lipschitz`."""
    from unlearn_lens.lipschitz import run_lipschitz

    run_lipschitz(settings)


def tuned_lens_step(settings: TunedLensSettings) -> None:
    """The pipeline step of `tuned-lens`."""
    from unlearn_lens.tuned_lens import run_tuned_lens

    run_tuned_lens(settings)


def relearn_step(settings: RelearnSettings) -> None:
    """The pipeline step of `relearn`."""
    from unlearn_lens.relearn import run_relearn

    run_relearn(settings)


def attack_step(settings: AttackSettings) -> None:
    """The pipeline step of `attack` (progress on stderr)."""
    from unlearn_lens.attacks.runner import run_attacks

    run_attacks(settings, echo=lambda message: click.echo(message, err=True))


# --- the plan ---------------------------------------------------------------------------------------

def capture_settings(settings: PipelineSettings, entry: ModelEntry) -> CaptureRun:
    """`capture` of ``entry`` into OUT/caches/<name>.zarr with the run's sizes and dtypes."""
    from unlearn_lens.capture import CaptureRun, CaptureSettings

    s = settings
    return CaptureRun(s.model_ref(entry), str(s.data_dir), str(s.cache(entry.name)), CaptureSettings(
        max_samples=s.max_samples, max_length=s.max_length, batch_size=s.batch_size, dtype=s.cache_dtype,
        model_dtype=s.model_dtype, device=s.device, overwrite=s.force))


def lipschitz_settings(settings: PipelineSettings, entry: ModelEntry) -> LipschitzSettings:
    """`lipschitz` base -> ``entry``: --lipschitz-samples texts of at most LIPSCHITZ_MAX_LENGTH tokens;
    ``lipschitz_options`` override fields (the demo's short run)."""
    from unlearn_lens.lipschitz import LipschitzSettings, parse_eps

    s = settings
    return LipschitzSettings(
        s.model_ref(s.base), s.model_ref(entry), str(s.data_dir), str(s.outdir), name_a=s.base.name,
        name_b=entry.name, eps_values=tuple(parse_eps(s.lipschitz_eps)), max_samples=s.lipschitz_samples,
        max_length=min(s.max_length, LIPSCHITZ_MAX_LENGTH), compute=Compute(s.device, s.model_dtype),
        overwrite=s.force, **s.lipschitz_options)


def tuned_lens_settings(settings: PipelineSettings, entry: ModelEntry) -> TunedLensSettings:
    """`tuned-lens` of ``entry`` from its cache; texts, lengths and batch size are the command's defaults."""
    s = settings
    return TunedLensSettings(s.model_ref(entry), entry.name, str(s.data_dir), str(s.outdir),
                             compute=Compute(s.device, s.model_dtype), steps=s.tuned_lens_steps,
                             tokens_per_step=s.tuned_lens_tokens, cache=str(s.cache(entry.name)), overwrite=s.force)


def relearn_settings(settings: PipelineSettings, entry: ModelEntry) -> RelearnSettings:
    """`relearn` on ``entry`` against the base; ``relearn_options`` override fields (the demo's short run)."""
    from unlearn_lens.relearn import RelearnSettings

    s = settings
    plain = RelearnSettings(s.model_ref(entry), s.model_ref(s.base), str(s.data_dir), str(s.outdir), name=entry.name,
                            compute=Compute(s.device, s.model_dtype, s.batch_size), max_samples=s.max_samples,
                            max_length=s.max_length, overwrite=s.force)
    return dataclasses.replace(plain, **s.relearn_options)


def attack_settings(settings: PipelineSettings, entry: ModelEntry) -> AttackSettings:
    """`attack` for base -> ``entry``: outputs in OUT/<name>/attacks, the pipeline's caches."""
    from unlearn_lens.attacks.base import AttackSettings
    from unlearn_lens.attacks.options import typed_options

    s = settings
    attacks = tuple(s.attack_names) or AttackSettings.attacks  # default: every attack (the command's default)
    return AttackSettings(
        base=s.base.spec, model=entry.spec, name=entry.name, data=str(s.data_dir), outdir=str(s.outdir),
        attacks=attacks, cache_base=str(s.cache(s.base.name)), cache_model=str(s.cache(entry.name)),
        base_revision=s.base.revision, model_revision=entry.revision, device=s.device, dtype=s.model_dtype,
        batch_size=s.batch_size, max_length=s.max_length, max_samples=s.attack_max_samples or s.max_samples,
        force=s.force, trust_remote_code=s.trust_remote_code, options=typed_options(s.attack_options, attacks))


def plan(settings: PipelineSettings) -> list[Step]:
    """The ordered steps of a run (datasets, captures, params, analyze, live diagnostics, relearn, attack)."""
    from analyses.activations.analyze_step import AnalyzeSettings
    from analyses.weights.params_step import ParamsSettings
    from unlearn_lens.data import DatasetSettings

    s = settings
    models = [s.base, *s.models]
    steps: list[Step] = []
    if s.data is None:
        steps.append(Step("datasets", datasets_step, DatasetSettings(str(s.data_dir)),
                          describe="WMDP-Bio and WikiText-2 from the hub"))
    data_need = () if s.data is not None else ("datasets",)
    data = str(s.data_dir)

    def models_of(*entries: ModelEntry) -> list[tuple[str, str, str | None]]:
        return [(entry.name, entry.spec, entry.revision) for entry in entries]

    for entry in models:
        steps.append(Step(f"capture:{entry.name}", capture_step, capture_settings(s, entry), data_need,
                          models=models_of(entry), data=data))
    for entry in s.models:
        params = ParamsSettings(ModelRef(s.base.spec, s.base.revision), ModelRef(entry.spec, entry.revision),
                                str(s.comparison_dir(entry.name)), empirical_rank=s.empirical_rank, force=s.force,
                                **({"workers": s.workers} if s.workers else {}))
        steps.append(Step(f"params:{entry.name}", params_step, params, models=models_of(s.base, entry)))
    analyze = AnalyzeSettings(str(s.cache(s.base.name)), tuple(f"{e.name}={s.cache(e.name)}" for e in s.models),
                              str(s.outdir), base_name=s.base.name, workers=s.workers or None)
    steps.append(Step("analyze", analyze_step, analyze, [f"capture:{e.name}" for e in models],
                      models=models_of(*models), caches=[str(s.cache(e.name)) for e in models]))
    for entry in s.models:
        steps.append(Step(f"lipschitz:{entry.name}", lipschitz_step, lipschitz_settings(s, entry), data_need,
                          models=models_of(s.base, entry), data=data))
    for entry in models:
        steps.append(Step(f"tuned-lens:{entry.name}", tuned_lens_step, tuned_lens_settings(s, entry),
                          [f"capture:{entry.name}"], models=models_of(entry), data=data,
                          caches=[str(s.cache(entry.name))]))
    if s.relearn:
        for entry in s.models:
            steps.append(Step(f"relearn:{entry.name}", relearn_step, relearn_settings(s, entry), data_need,
                              describe="fine-tuning attack: steps to recover half the gap to the base",
                              models=models_of(entry, s.base), data=data))
    if s.attacks:
        for entry in s.models:
            steps.append(Step(f"attack:{entry.name}", attack_step, attack_settings(s, entry),
                              [*data_need, f"capture:{s.base.name}", f"capture:{entry.name}"],
                              describe="attacks: direction ablation, quantization, relearning controls",
                              models=models_of(s.base, entry), data=data,
                              caches=[str(s.cache(s.base.name)), str(s.cache(entry.name))]))
    return [step for step in steps if step.id.split(":")[0] not in s.skip]


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of its finished child processes."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _marker(settings: PipelineSettings, step_id: str) -> Path:
    return outputs.pipeline_record(settings.outdir, step_id)


def _write_marker(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=2))


def _read_record(path: Path) -> dict | None:
    """A step's record, None when the step has none (or an unreadable one: it runs again)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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
        inputs = step.inputs()
        recorded = _read_record(marker)
        if recorded is not None and not settings.force:
            if recorded.get("inputs", inputs) == inputs:  # a record from before inputs were recorded: done
                status[step.id] = "skipped (done)"
                echo(f"{prefix}: already done")
                continue
            echo(f"{prefix}: its inputs changed since it ran (models, data, caches or settings); running it again")
        marker.unlink(missing_ok=True)
        echo(f"{prefix}: running")
        started, cpu_started = time.time(), _cpu_seconds()
        try:
            step.run()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the run goes on
            message = explain(exc, writing=str(settings.outdir)) or (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            status[step.id] = f"failed: {message}"
            echo(f"{prefix}: FAILED: {message}")
            if os.environ.get("UNLEARN_LENS_DEBUG"):
                raise
            if step.id in prerequisites:
                raise UserError(f"step {step.id} failed: {message}; finished steps are kept, "
                                "rerun the same command to resume") from None
            continue
        _write_marker(marker, {"step": step.id, "seconds": round(time.time() - started, 1),
                               "cpu_seconds": round(_cpu_seconds() - cpu_started, 1), "inputs": inputs})
        status[step.id] = "done"
        echo(f"{prefix}: done in {time.time() - started:.0f}s")
    if "report" not in settings.skip:
        from analyses.report import ReportInputs, write_report

        path = write_report(ReportInputs(settings.outdir, settings.base.name, [m.name for m in settings.models],
                                         steps=status, **settings.extra_report))
        status["report"] = "done"
        echo(f"report: {path}")
    return status
