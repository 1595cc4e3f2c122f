"""`unlearn-lens study`: do the signatures predict recovery? Many unlearned models, scored leave-one-method-out.

``run_study(StudySettings)`` unlearns the base model with each method at several strengths (one
knob per method, ``STRENGTH_KNOBS``, multiplied by each strength), then runs the pipeline's steps
(captures, params, analyze, Lipschitz, tuned lens, the attacks with their reference evaluations)
for every unlearned model, each a comparison ``base__to__<method>-x<strength>`` in OUT, and ends
with ``analyses.study.write.write_study`` (OUT/study/) and the report. Everything resumes: a
finished unlearning run (its ``COMPLETE`` marker) and every finished pipeline step are skipped;
an unlearning run that fails is named and left out, the others go on.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_write_text
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.settings import CAPTURE_MAX_SAMPLES, DEFAULT_BATCH_SIZE, DEFAULT_DEVICE, DEFAULT_MAX_LENGTH
from unlearn_lens.demo import (COMMON_SETTINGS, DEMO_ATTACK_OPTIONS, DEMO_DEFAULT_STEPS, DEMO_EVAL_SAMPLES,
                               DEMO_LIPSCHITZ_SETTINGS, DEMO_METHOD_SETTINGS, TESTBED_METHOD_SETTINGS)
from unlearn_lens.pipeline import ModelEntry, PipelineSettings

if TYPE_CHECKING:
    from unlearn_lens.unlearning.config import UnlearnConfig

#: The knob each method's strength multiplies: the learning rate of the loss-based and adversarial
#: methods (same steps and cost at every strength), RMU's steering coefficient (the norm of the random
#: target its forget activations are pushed to), the noise std of wt_dist and the distance weight
#: lambda of wt_dist_reg (each method's own coefficient).
STRENGTH_KNOBS: dict[str, str] = {
    "ga_simple": "lr", "ga": "lr", "grad_diff": "lr", "dpo": "lr", "npo": "lr", "simnpo": "lr",
    "rmu": "steering_coeff", "cb": "lr", "lat": "lr", "cb_lat": "lr",
    "wt_dist": "wt_noise_std", "wt_dist_reg": "wt_reg_lambda",
}
#: Knobs that are counts (rounded after scaling).
INTEGER_KNOBS = frozenset({"steps"})
#: Eight methods of four families (gradient, preference, representation, weight) by default.
DEFAULT_METHODS = ("ga", "grad_diff", "dpo", "npo", "simnpo", "rmu", "cb", "wt_dist")
#: Light, the demo's setting, strong: multipliers of each method's knob.
DEFAULT_STRENGTHS = (0.5, 1.0, 2.0)
#: Training modes: None follows each method's reference (LoRA where its reference preset trains LoRA).
TRAINING_MODES = ("full", "lora")
#: The study's base model name (its comparisons are ``base__to__<model>``).
BASE_NAME = "base"
#: The attacks' options in a study: the demo's short settings with int8 beside the demo's int4 (groups of 32)
#: (two settings, so the headline chooses one on half the evaluation items and scores it on the other half).
STUDY_ATTACK_OPTIONS = {**DEMO_ATTACK_OPTIONS, "quant_settings": ("int8", "int4-g32")}


@dataclass
class StudySettings:
    """Everything a study needs; the unlearning and diagnostic settings default to the demo's (sized for
    SmolLM2-135M on 2 CPU cores), with every attack."""

    model: str
    data: Path
    outdir: Path
    revision: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    training: str | None = None  # "full", "lora", or None: as each method's reference preset trains
    preset: str = "original"  # "original": the demo's per-method settings; else an `unlearn --preset`
    unlearn_steps: int | None = None
    unlearn_options: dict = field(default_factory=dict)  # UnlearnConfig fields set for every run (tests: tiny sizes)
    device: str = DEFAULT_DEVICE
    max_samples: int = CAPTURE_MAX_SAMPLES
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    force: bool = False
    skip: frozenset[str] = frozenset()
    workers: int | None = None
    lipschitz_samples: int = 8
    tuned_lens_steps: int = 12
    tuned_lens_tokens: int = 128
    attacks: tuple[str, ...] = ()  # empty: every attack
    attack_max_samples: int = DEMO_EVAL_SAMPLES["attack"]
    attack_options: dict = field(default_factory=lambda: dict(STUDY_ATTACK_OPTIONS))

    def model_name(self, method: str, strength: float) -> str:
        """``<method>-x<strength>``: ``ga-x0.5``."""
        return f"{method}-x{strength:g}"

    def run_dir(self, name: str) -> Path:
        """``OUT/unlearning/<name>``: where the unlearned model goes (its ``model/``, ``eval.json``)."""
        return self.outdir / outputs.UNLEARNING / name


@dataclass(frozen=True)
class StudyModel:
    """One unlearned model of the design."""

    name: str
    method: str
    knob: str
    strength: float
    value: float
    training: str


def validate(settings: StudySettings) -> None:
    """Every check that needs no model, in one line each."""
    from unlearn_lens.unlearning.method_names import METHODS

    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(settings.methods)) < 2 or len(set(settings.methods)) != len(settings.methods):
        raise UserError("--methods: name at least two distinct methods (each is held out in turn)")
    if not settings.strengths or any(s <= 0 for s in settings.strengths) or \
            len(set(settings.strengths)) != len(settings.strengths):
        raise UserError(f"--strengths: give distinct positive multipliers, got {settings.strengths}")
    if settings.training not in (None, *TRAINING_MODES):
        raise UserError(f"training mode {settings.training!r}: choose full or lora")


def training_mode(settings: StudySettings, method: str) -> str:
    """``full`` or ``lora`` for ``method``: the flag's, else as its reference preset trains; weight-space
    methods are always full (LoRA adapters do not expose the weights they act on)."""
    from unlearn_lens.unlearning import presets
    from unlearn_lens.unlearning.method_names import METHODS

    if METHODS[method][0] == "weight":
        return "full"
    if settings.training is not None:
        return settings.training
    reference = presets.PRESETS.get(method, {}).get("reference")
    return "lora" if reference is not None and reference.values.get("lora") else "full"


def demo_settings(data: str | Path, method: str) -> dict:
    """The demo's settings of ``method`` on this data: on a planted-facts testbed the testbed's (rmu, ga),
    else (and for the methods the testbed has none for) the WMDP-style demo's."""
    from unlearn_lens.testbed import is_testbed

    if is_testbed(data) and method in TESTBED_METHOD_SETTINGS:
        return dict(TESTBED_METHOD_SETTINGS[method])
    return dict(DEMO_METHOD_SETTINGS.get(method, {"steps": DEMO_DEFAULT_STEPS}))


def unlearn_config(settings: StudySettings, method: str, strength: float) -> UnlearnConfig:
    """The UnlearnConfig of one model of the study: the method's demo settings on this data (or
    ``preset``'s), the study's common sizes, then the knob multiplied by ``strength`` and the training mode."""
    from unlearn_lens.unlearning import presets
    from unlearn_lens.unlearning.config import UnlearnConfig

    values = demo_settings(settings.data, method)
    if settings.preset != "original":
        values = {"steps": values["steps"]}
    if settings.unlearn_steps is not None:
        values["steps"] = settings.unlearn_steps
    values.update(COMMON_SETTINGS)
    values.update(settings.unlearn_options)
    values["lora"] = training_mode(settings, method) == "lora"
    name = settings.model_name(method, strength)
    given = {"model", "data", "device", *values, *(["overwrite"] if settings.force else [])}
    config = UnlearnConfig(model=settings.model, revision=settings.revision, data=str(settings.data),
                           outdir=str(settings.run_dir(name)), method=method, device=settings.device,
                           overwrite=settings.force,
                           preset=presets.DEFAULT_PRESET if settings.preset == "original" else settings.preset,
                           **values)
    config.apply_preset(given)
    knob = STRENGTH_KNOBS[method]
    scaled = getattr(config, knob) * strength
    setattr(config, knob, round(scaled) if knob in INTEGER_KNOBS else float(scaled))
    return config


def design(settings: StudySettings) -> list[tuple[StudyModel, UnlearnConfig]]:
    """Every model of the study with its unlearning config, method by method, light to strong."""
    out = []
    for method in settings.methods:
        for strength in sorted(settings.strengths):
            config = unlearn_config(settings, method, strength)
            knob = STRENGTH_KNOBS[method]
            out.append((StudyModel(settings.model_name(method, strength), method, knob, strength,
                                   float(getattr(config, knob)), "lora" if config.lora else "full"), config))
    return out


def write_design(settings: StudySettings, models: list[StudyModel]) -> Path:
    """``OUT/study/models.csv``: the study's design (read by ``analyses.study``)."""
    import io

    from analyses.study.tables import DESIGN_COLUMNS

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(DESIGN_COLUMNS)
    for m in models:
        writer.writerow([m.name, m.method, m.knob, repr(m.strength), repr(m.value), m.training])
    return atomic_write_text(settings.outdir / outputs.STUDY / outputs.STUDY_MODELS_CSV, buffer.getvalue())


def pipeline_settings(settings: StudySettings, names: list[str]) -> PipelineSettings:
    """The pipeline run over the unlearned models ``names``: the attacks on, the report left to the study."""
    from unlearn_lens.attacks.base import AttackSettings, attack_options

    s = settings
    known = attack_options(s.attacks or AttackSettings.attacks)
    return PipelineSettings(
        outdir=s.outdir, base=ModelEntry(BASE_NAME, s.model, s.revision),
        models=[ModelEntry(name, str(s.run_dir(name) / "model")) for name in names], data=s.data,
        device=s.device, max_samples=s.max_samples, max_length=s.max_length, batch_size=s.batch_size,
        force=s.force, skip=frozenset(s.skip) | {"report"}, workers=s.workers, lipschitz_samples=s.lipschitz_samples,
        lipschitz_options=dict(DEMO_LIPSCHITZ_SETTINGS), tuned_lens_steps=s.tuned_lens_steps,
        tuned_lens_tokens=s.tuned_lens_tokens, attacks=True, attack_names=tuple(s.attacks),
        attack_max_samples=min(s.attack_max_samples, s.max_samples),
        # the study's default options of attacks not chosen are left out; any other unknown key is refused later
        attack_options={k: v for k, v in s.attack_options.items() if k in known or k not in STUDY_ATTACK_OPTIONS})


def unlearn_all(settings: StudySettings, models: list[tuple[StudyModel, UnlearnConfig]],
                echo: Callable[[str], None]) -> dict[str, str]:
    """Train every model not yet finished; ``{name: "done" | "skipped (done)" | "failed: ..."}``."""
    from unlearn_lens.unlearning.trainer import is_complete, run_unlearning

    status = {}
    for number, (model, config) in enumerate(models, start=1):
        prefix = f"[unlearn {number}/{len(models)}] {model.name} ({model.knob} = {model.value:g}, {model.training})"
        if is_complete(config.outdir) and not settings.force:
            status[model.name] = "skipped (done)"
            echo(f"{prefix}: already done")
            continue
        echo(f"{prefix}: running")
        try:
            config.validate()
            run_unlearning(config, progress=True)
        except Exception as exc:  # noqa: BLE001 - one failed method is named, the study goes on
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            status[model.name] = f"failed: {message}"
            echo(f"{prefix}: FAILED: {message}")
            continue
        status[model.name] = "done"
    return status


def run_study(settings: StudySettings, echo: Callable[[str], None] = click.echo) -> dict[str, str]:
    """Unlearn, run every step for every model, write OUT/study/ and the report; returns each step's status."""
    from analyses.report import ReportInputs, write_report
    from analyses.study.write import write_study
    from unlearn_lens.pipeline import check_inputs, run_pipeline

    validate(settings)
    check_inputs(pipeline_settings(settings, []))
    models = design(settings)
    write_design(settings, [m for m, _ in models])
    status = {f"unlearn:{name}": state for name, state in unlearn_all(settings, models, echo).items()}
    finished = [m.name for m, _ in models if status[f"unlearn:{m.name}"].startswith(("done", "skipped"))]
    pipeline = pipeline_settings(settings, finished)
    status.update(run_pipeline(pipeline, echo=echo))
    try:
        folder = write_study(settings.outdir, BASE_NAME, echo=echo)
        status["study"] = "done"
        echo(f"study: {folder}")
    except UserError as exc:
        status["study"] = f"failed: {exc}"
        echo(f"study: FAILED: {exc}")
    if "report" not in settings.skip:
        path = write_report(ReportInputs(settings.outdir, BASE_NAME, finished, steps=status))
        status["report"] = "done"
        echo(f"report: {path}")
    return status
