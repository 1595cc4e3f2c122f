"""Presets of wt_dist and wt_dist_reg.

``reference`` = Siddiqui et al. 2025 (shoaibahmed/vision_relearning): ``scripts/train.sh`` sets
``weight_distortion`` alpha (noise std) 0.02 and ``weight_dist_reg`` alpha (lambda) 1.0,
unlearning LR 1e-5, weight decay 0, AdamW (``train_utils.get_optimizer``); the distance is
``sqrt(mean((theta_0 - theta)^2) + 1e-8)`` (``vision_unlearner.py``), added to the retain CE.
"""

from __future__ import annotations

from unlearn_lens.unlearning.presets import Preset

_ORIGINAL = Preset("original", {}, "this tool's defaults (the original pipeline's settings)")
_SOURCE = "Siddiqui et al. 2025; shoaibahmed/vision_relearning scripts/train.sh, vision_unlearner.py, train_utils.py"
_TRAINING = {"lr": 1e-5, "weight_decay": 0.0, "optimizer": "adamw"}

PRESETS: dict[str, dict[str, Preset]] = {
    "wt_dist": {"original": _ORIGINAL,
                "reference": Preset("reference", {**_TRAINING, "wt_noise_std": 0.02}, _SOURCE)},
    "wt_dist_reg": {"original": _ORIGINAL,
                    "reference": Preset("reference", {**_TRAINING, "wt_reg_lambda": 1.0, "wt_reg_eps": 1e-8}, _SOURCE)},
}
