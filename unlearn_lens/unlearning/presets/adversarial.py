"""Presets of the adversarial / representation methods: cb, cb_lat, lat.

``original`` is what ``unlearn`` did before presets (the original pipeline's settings, today's
defaults written out); ``reference`` is the published configuration. Layers are block outputs
(``tap_blocks``: the residual stream after block ``i``; -1 is the embedding output, never
scaled); the fields a preset lists in ``depth_scaled`` hold them for a 32-layer model and are
scaled with ``scale_layers`` when the model's depth is known. The references index
``output_hidden_states``, whose entry ``l`` is the output of block ``l - 1``: GraySwan's target
layers 10, 20 are block outputs 9, 19 here; deep ignorance's 5, 10, ..., 30 are 4, 9, ..., 29.
cb / cb_lat ``reference`` train with dropout on (``train_dropout``): the references run their
adapted passes in train mode, so LoRA's dropout 0.05 acts; their frozen passes and cb_lat's
attack run in eval mode, as ours (``methods.eval_mode``).
"""

from __future__ import annotations

from unlearn_lens.unlearning.presets import Preset

#: the original pipeline's optimisation (today's ``UnlearnConfig`` defaults).
_ORIGINAL_OPTIMISATION = {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.0, "lr_scheduler": "cosine",
                          "warmup_steps": 0, "grad_clip": 1.0, "batch_size": 4, "grad_accum_steps": 1,
                          "lora": False}
_ORIGINAL_CB = {"cb_variant": "original", "alpha": 100.0, "steering_coeff": 20.0, "layer_id": None,
                "target_layers": None}
_ORIGINAL_ADVERSARY = {"adversary": "pgd", "adversary_layers": None, "adversary_lr": None, "lat_norm": "linf",
                       "lat_eps": 1.0, "lat_steps": 5, "lat_step_size": None}
_ORIGINAL_SOURCE = "the original pipeline's settings (/work/shared/original-pipeline-README.md; unlearn before presets)"

#: GraySwan circuit breakers (Zou et al. 2024) as in scripts/lorra_circuit_breaker_llama3_8b.sh.
_GRAYSWAN = Preset(
    name="reference",
    values={"cb_variant": "rr", "alpha": 10.0, "target_layers": [9, 19], "rr_retain_mean": "padded",
            "max_length": 1024, "lora": True, "lora_r": 16,
            "lora_alpha": 16.0, "lora_dropout": 0.05, "train_dropout": True, "lora_targets": None,
            "optimizer": "adamw", "lr": 1e-4,
            "weight_decay": 0.0, "lr_scheduler": "constant", "warmup_steps": 0, "grad_clip": 1.0,
            "batch_size": 16, "grad_accum_steps": 1, "steps": 150},
    depth_scaled=("target_layers",),
    source="Zou et al. 2024, Improving Alignment and Robustness with Circuit Breakers; GraySwanAI/circuit-breakers "
           "src/lorra_circuit_breaker.py (copy: EleutherAI/unlearn unlearn/reference/grey_swan_circuit_breaker/"
           "lorra.py): lorra_alpha 10, target layers 10,20 (hidden_states), retain anchor a nanmean over the retain "
           "text padded to 1024 tokens (model_max_length), LoRA r16/alpha16/dropout 0.05 on every linear of the "
           "blocks up to the last target (args.py's lora_target_modules), lr 1e-4 constant, 150 steps, batch 16",
)

#: deep ignorance's rr-lat (O'Brien et al. 2025): unlearning.py --alg rr-lat as its run script
#: rr-lat.sh calls it (--lr 2e-3 --adv_lr 2e-3 --remove_coef 300 --attack_iters 4; retain_coef
#: keeps its default 5). The script's values, not unlearning.py's defaults (remove_coef = retain_coef
#: = 5, lr 1e-3, 8 iterations): with equal coefficients the retain anchor, whose gradient does not
#: vanish at the start, holds the adapter at zero (measured on SmolLM2, tests/test_unlearn_smollm2.py).
_DEEP_IGNORANCE = Preset(
    name="reference",
    values={"cb_variant": "rr", "alpha": 5.0, "forget_weight": 60.0, "target_layers": [4, 9, 14, 19, 24, 29],
            "rr_retain_mean": "padded", "max_length": 2048,
            "adversary": "combined", "adversary_layers": [-1], "adversary_lr": 2e-3, "lat_steps": 4,
            "lora": True, "lora_r": 16, "lora_alpha": 16.0, "lora_dropout": 0.05, "train_dropout": True,
            "lora_targets": ["peft-default"], "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01,
            "lr_scheduler": "linear", "warmup_steps": 0, "grad_clip": 1.0, "batch_size": 1, "grad_accum_steps": 32},
    depth_scaled=("target_layers",),
    source="O'Brien et al. 2025, Deep Ignorance; EleutherAI/unlearn unlearn/reference/cas/unlearning.py "
           "(RRTrainer, gradient_descent_attack; --alg rr-lat) as run by rr-lat.sh: retain_coef 5 (alpha), "
           "remove_coef 300 (alpha x forget weight 60), layers 5,10,...,30 (hidden_states), CombinedAdversary "
           "adv_lr 2e-3 x 4 iterations at the embedding (its MLP adversaries at the target layers lie between "
           "scored layers and are left out), retain anchor a nanmean over the retain text padded to MAX_LENGTH "
           "2048, LoRA r16/alpha16/dropout 0.05 up to the last target on PEFT's default modules (target_modules=None "
           "but for OLMo), lr 2e-3, weight decay 0.01, batch 1 x 32 accumulated",
)

#: targeted LAT (Sheshadri et al. 2024), notebooks/unlearning_wmdp.ipynb's ProjectedGradLAT call.
_TARGETED_LAT = Preset(
    name="reference",
    values={"adversary": "targeted", "adversary_layers": [7], "lat_eps": 2.0, "adversary_lr": 5e-2,
            "lat_steps": 16, "adversary_away_coef": 1.0, "lat_defender": "away", "lat_toward_coef": 1.0,
            "lat_sft_coef": 4.0, "lora": True, "lora_r": 64,
            "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_targets": None, "optimizer": "adamw", "lr": 5e-5,
            "weight_decay": 0.01, "lr_scheduler": "constant", "warmup_steps": 0, "grad_clip": 0.5, "steps": 200,
            "batch_size": 4, "grad_accum_steps": 1, "max_length": 600},
    depth_scaled=("adversary_layers",),
    source="Sheshadri et al. 2024, Latent Adversarial Training Improves Robustness to Persistent Harmful "
           "Behaviors in LLMs; aengusl/latent-adversarial-training latent_at/lat_methods.py "
           "(ProjectedGradLAT, projected_gradient_descent), latent_at/lat_helpers.py (do_adversary_step, "
           "do_defense_step, compute_toward_away_loss), latent_at/lat_datasets.py (load_targeted_wmdp_data: forget "
           "text = adv_tokens, retain text = def_tokens), notebooks/unlearning_wmdp.ipynb: pgd_layers [7], epsilon "
           "2, inner lr 5e-2 x 16, adv_loss_coefs toward 1 / away 1, outer lr 5e-5, def_loss_coefs toward 1 / away "
           "1 / sft 4 (each set normalised), clip_grad 0.5, LoRA r64 (alpha 8), batch 4, 600 tokens, 200 steps",
)

PRESETS: dict[str, dict[str, Preset]] = {
    "cb": {
        "original": Preset("original", {**_ORIGINAL_OPTIMISATION, **_ORIGINAL_CB}, _ORIGINAL_SOURCE),
        "reference": _GRAYSWAN,
    },
    "cb_lat": {
        "original": Preset("original", {**_ORIGINAL_OPTIMISATION, **_ORIGINAL_CB, **_ORIGINAL_ADVERSARY},
                           _ORIGINAL_SOURCE),
        "reference": _DEEP_IGNORANCE,
    },
    "lat": {
        "original": Preset("original", {**_ORIGINAL_OPTIMISATION, **_ORIGINAL_ADVERSARY, "layer_id": None,
                                        "target_layers": None, "lat_defender": "ascent"}, _ORIGINAL_SOURCE),
        "reference": _TARGETED_LAT,
    },
}
