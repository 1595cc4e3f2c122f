"""Presets of the logit-loss methods: ga_simple, ga, grad_diff, dpo, npo, simnpo.

``reference`` = open-unlearning's TOFU unlearning runs (locuslab/open-unlearning):
``configs/trainer/finetune.yaml`` (per-device batch 8, gradient accumulation 4, bf16, AdamW,
HF Trainer's default linear decay and max_grad_norm 1.0), ``configs/experiment/unlearn/tofu/
{default,idk}.yaml`` (lr 1e-5, weight decay 0.01, 10 epochs, warm-up one epoch) and the method
configs ``configs/trainer/{GradAscent,GradDiff,DPO,NPO,SimNPO}.yaml`` (gamma = forget weight,
alpha = retain weight 1, retain loss NLL); losses from ``src/trainer/unlearn/*.py`` and
``src/trainer/utils.py``. open-unlearning has no WMDP config for these methods (its WMDP
experiment is RMU only), so TOFU's is the published one.
"""

from __future__ import annotations

from unlearn_lens.unlearning.presets import Preset

_ORIGINAL = "this tool's defaults (the original pipeline's settings)"
_OU = ("open-unlearning (locuslab/open-unlearning) configs/experiment/unlearn/tofu/{file}, "
       "configs/trainer/{trainer}.yaml, src/trainer/unlearn/{code}")
#: open-unlearning's TOFU training arguments (finetune.yaml + experiment/unlearn/tofu/*.yaml).
TOFU_TRAINING = {"lr": 1e-5, "weight_decay": 0.01, "batch_size": 8, "grad_accum_steps": 4, "epochs": 10,
                 "warmup_epochs": 1.0, "optimizer": "adamw", "lr_scheduler": "linear", "grad_clip": 1.0,
                 "max_length": 512}


def _pair(values: dict, file: str, trainer: str, code: str, paper: str) -> dict[str, Preset]:
    source = f"{paper}; " + _OU.format(file=file, trainer=trainer, code=code)
    return {"original": Preset("original", {}, _ORIGINAL),
            "reference": Preset("reference", {**TOFU_TRAINING, **values}, source)}


PRESETS: dict[str, dict[str, Preset]] = {
    "ga_simple": _pair({}, "default.yaml", "GradAscent", "grad_ascent.py", "Maini et al. 2024 (TOFU)"),
    "ga": _pair({}, "default.yaml", "GradDiff", "grad_diff.py (gamma=alpha=1)", "Maini et al. 2024 (TOFU)"),
    "grad_diff": _pair({"forget_weight": 1.0}, "default.yaml", "GradDiff", "grad_diff.py",
                       "Maini et al. 2024 (TOFU)"),
    "dpo": _pair({"beta": 0.1, "forget_weight": 1.0}, "idk.yaml", "DPO", "dpo.py + utils.compute_dpo_loss",
                 "Rafailov et al. 2023, as in TOFU (Maini et al. 2024) / NPO (Zhang et al. 2024)"),
    "npo": _pair({"beta": 0.1, "forget_weight": 1.0}, "default.yaml", "NPO", "npo.py + utils.compute_dpo_loss",
                 "Zhang et al. 2024 (NPO)"),
    "simnpo": _pair({"beta": 4.5, "forget_weight": 0.125}, "default.yaml", "SimNPO", "simnpo.py",
                    "Fan et al. 2024 (SimNPO; gamma=0.125 is Unlearn-Simple's TOFU npo_coeff)"),
}
