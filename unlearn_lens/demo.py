"""The offline demo: SmolLM2-135M as base, models unlearned by this tool on the demo data.

Hyperparameters per method were chosen so that each run takes about a minute on 2 CPU cores
and moves forget NLL clearly more than retain NLL (see README, "The demo").
"""

from __future__ import annotations

from pathlib import Path

from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.pipeline import ModelEntry, PipelineSettings, Step, run_command

#: Demo flags per method (SmolLM2-135M, 30 layers, demo data of ~150 forget / ~150 retain lines).
DEMO_METHOD_FLAGS: dict[str, list[str]] = {
    # WMDP's lr of 5e-5 is sized for 7B models and hundreds of steps; on SmolLM2 in 20 steps it
    # moves nothing, 1e-3 lowers cloze accuracy with retain NLL unchanged.
    "rmu": ["--layer-id", "7", "--steering-coeff", "20", "--alpha", "100", "--lr", "1e-3", "--steps", "20"],
    "ga": ["--lr", "4e-5", "--steps", "30"],
    "grad_diff": ["--lr", "2e-5", "--steps", "30", "--forget-weight", "1.0"],
    "npo": ["--lr", "2e-5", "--steps", "30"],
    "simnpo": ["--lr", "2e-5", "--steps", "30"],
    "cb": ["--layer-id", "7", "--lr", "5e-5", "--steps", "40"],
}
COMMON_FLAGS = ["--batch-size", "4", "--max-length", "128", "--seed", "0"]
#: The demo's relearning attack: 4 steps of 2 texts from 8 forget texts, evaluated at the end only, at an
#: LR at which SmolLM2 moves within a few steps (the command's 1e-5 is sized for 7B models and 50+ steps).
#: On 2 cores a SmolLM2 evaluation costs more than a training step, so the demo evaluates little.
DEMO_RELEARN_FLAGS = ("--steps", "4", "--eval-every", "4", "--forget-subset", "8", "--batch-size", "2",
                      "--lr", "1e-4")
#: Texts (and questions) each relearning / attack evaluation reads in the demo (at most --max-samples).
DEMO_EVAL_SAMPLES = {"relearn": 12, "attack": 12}
#: The demo's attack options: int4 only (the setting Zhang et al. 2024 find recovers knowledge),
#: relearning controls of 4 steps of 2 texts at the same LR, and ablation of the difference-in-means
#: direction (k = 1) at the layer where it is largest and one more layer, then by weight
#: orthogonalisation at the first (3 settings instead of the command's up to 12).
DEMO_ATTACK_OPTIONS = {"quant_settings": ("int4",), "relearn_steps": 4, "relearn_batch_size": 2, "relearn_lr": 1e-4,
                       "ablate_k": (1,), "ablate_top_layers": 1, "ablate_spread_layers": 1}

def demo_settings(outdir: Path, methods: str, **options) -> PipelineSettings:
    """Pipeline settings of the demo: base SmolLM2, one model per unlearning method, short attack settings."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise UserError("--methods: name at least one unlearning method")
    base = ModelEntry("smollm2", str(outdir / "models" / "smollm2"))
    models = [ModelEntry(name, str(outdir / outputs.UNLEARNING / name / "model")) for name in names]
    samples = options.get("max_samples", PipelineSettings.max_samples)
    options = {"relearn_flags": (*DEMO_RELEARN_FLAGS, "--max-samples", str(min(DEMO_EVAL_SAMPLES["relearn"], samples))),
               "attack_max_samples": min(DEMO_EVAL_SAMPLES["attack"], samples),
               "attack_options": dict(DEMO_ATTACK_OPTIONS), **options}
    return PipelineSettings(outdir=outdir, base=base, models=models, data=outdir / outputs.DATA, **options)


def demo_steps(settings: PipelineSettings, unlearn_steps: int | None = None, preset: str = "original") -> list[Step]:
    """Prerequisites: the base model, the demo data, and one unlearning run per method.

    ``preset`` other than ``original`` replaces the demo's per-method hyper-parameters by the
    preset's; the demo's step count, batch size, length and seed still apply (its time budget).
    """
    from unlearn_lens.loading import materialise_demo_model

    data = str(settings.data_dir)
    steps = [
        Step("model:smollm2", lambda: materialise_demo_model(settings.base.spec, overwrite=settings.force)),
        Step("datasets", lambda: run_command(["datasets", "create", "--demo", "--outdir", data])),
    ]
    for entry in settings.models:
        method = entry.name
        flags = list(DEMO_METHOD_FLAGS.get(method, ["--steps", "30"]))
        if preset != "original":
            flags = ["--preset", preset, "--steps", flags[flags.index("--steps") + 1]]
        if unlearn_steps is not None:
            index = flags.index("--steps") if "--steps" in flags else None
            if index is not None:
                del flags[index:index + 2]
            flags += ["--steps", str(unlearn_steps)]
        argv = ["unlearn", "--model", settings.base.spec, "--method", method, "--data", data,
                "--outdir", str(Path(entry.spec).parent), "--device", settings.device, *COMMON_FLAGS, *flags,
                *(["--overwrite"] if settings.force else [])]
        steps.append(Step(f"model:{method}", lambda a=argv: run_command(a)))
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
