"""Presets of rmu.

``reference`` = WMDP's published Zephyr-7B run (Li et al. 2024; cais/wmdp ``rmu/unlearn.py``,
command in ``run_rmu_zephyr.ipynb``): ``--max_num_batches 150 --batch_size 4 --steering_coeffs
6.5 --alpha 1200 --lr 5e-5``, defaults ``layer_id=7``, ``layer_ids=5,6,7``, ``param_ids=[6]``
(``mlp.down_proj``); transformers' ``AdamW(params, lr)`` (weight decay 0), no scheduler (constant
LR), no gradient clipping, forget texts truncated at 512 tokens (bio). Layers refer to Zephyr's
32 and are scaled by depth.
"""

from __future__ import annotations

from unlearn_lens.unlearning.presets import Preset

PRESETS: dict[str, dict[str, Preset]] = {
    "rmu": {
        "original": Preset("original", {}, "this tool's defaults (the original pipeline's settings)"),
        "reference": Preset(
            "reference",
            {"steering_coeff": 6.5, "alpha": 1200.0, "layer_id": 7, "update_layers": [5, 6, 7],
             "update_roles": ["down"], "lr": 5e-5, "lr_scheduler": "constant", "warmup_steps": 0, "grad_clip": 0.0,
             "optimizer": "adamw", "weight_decay": 0.0, "batch_size": 4, "steps": 150, "max_length": 512},
            "Li et al. 2024 (WMDP); cais/wmdp rmu/unlearn.py + run_rmu_zephyr.ipynb (Zephyr-7B run)",
            depth_scaled=("layer_id", "update_layers")),
    },
}
