"""The description of one unlearning run and the checks that can fail before any model loads.

Torch-free, so ``unlearn --help`` and input validation stay instant. Every field is written to
``OUT/config.json`` (with resolved defaults), so a run can be repeated exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_at_least, check_counts, check_positive
from unlearn_lens.core.settings import DEFAULT_MAX_LENGTH
from unlearn_lens.unlearning.lora import check_rule
from unlearn_lens.unlearning.method_names import METHODS

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor")
SCHEDULERS = ("cosine", "linear", "constant")
CB_VARIANTS = ("original", "rr")
LAT_NORMS = ("linf", "l2")
#: lat / cb_lat adversaries (see unlearning/adversary.py): the original PGD, targeted LAT's, deep ignorance's.
ADVERSARIES = ("pgd", "targeted", "combined")
#: the reference inner learning rates when --adversary-lr is not given (targeted LAT's
#: inner_learning_rate 5e-2; deep ignorance's --adv_lr 2e-3).
DEFAULT_ADVERSARY_LR = {"targeted": 5e-2, "combined": 2e-3}
#: lat's defender: the original ascent on forget NLL, or targeted LAT's log(1 - p) away loss.
LAT_DEFENDERS = ("ascent", "away")
#: rr's retain anchor: mean over real tokens, or GraySwan's / deep ignorance's ``nanmean`` over every
#: position of the retain batch padded to --max-length (the sum over real tokens / (layers x batch x max_length)).
RR_RETAIN_MEANS = ("tokens", "padded")
#: methods with a frozen reference model (or frozen activations / weights from it).
REFERENCE_METHODS = frozenset({"dpo", "npo", "rmu", "cb", "cb_lat"})


@dataclass
class UnlearnConfig:
    """Every setting of one run; ``None`` means "resolved from the model" (see ``resolve``)."""

    model: str
    data: str
    outdir: str
    method: str
    revision: str | None = None
    preset: str = "default"
    # data and batching
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 4
    grad_accum_steps: int = 1
    steps: int | None = None
    epochs: int | None = None
    #: train only the first N optimizer steps of the run (its schedules keep the full length).
    stop_after: int | None = None
    max_samples: int | None = None
    eval_split: float = 0.1
    eval_every: int | None = None
    eval_batch_size: int = 8
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    momentum: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_epochs: float | None = None
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    mixed_precision: str = "no"
    train_dropout: bool = False
    # method hyper-parameters
    forget_weight: float = 1.0
    beta: float = 0.1
    layer_id: int | None = None
    target_layers: list[int] | None = None
    steering_coeff: float = 20.0
    alpha: float = 100.0
    update_roles: list[str] | None = None
    update_layers: list[int] | None = None
    cb_variant: str = "original"
    rr_retain_mean: str = "tokens"
    lat_eps: float = 1.0
    lat_steps: int = 5
    lat_step_size: float | None = None
    lat_norm: str = "linf"
    adversary: str | None = None
    adversary_layers: list[int] | None = None
    adversary_lr: float | None = None
    lat_defender: str = "ascent"
    lat_toward_coef: float = 1.0
    lat_sft_coef: float = 4.0
    adversary_away_coef: float = 0.0
    wt_noise_std: float = 0.02
    wt_reg_lambda: float = 0.1
    wt_reg_eps: float = 1e-12
    # LoRA
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None
    lora_dropout: float = 0.0
    # logging and environment
    wandb: bool = False
    wandb_project: str = "unlearn-lens"
    trust_remote_code: bool = False
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: layer fields set by the preset at its reference depth (32), scaled to the model in resolve_layers.
    depth_scaled: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Checks that need no model: raise a one-line ``UserError`` on the first problem."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        kind = METHODS[self.method][0]
        if self.lora and kind == "weight":
            raise UserError(
                f"--lora cannot be used with {self.method}: it acts on the weights themselves "
                "(noise on / distance from every pretrained weight), which LoRA adapters do not expose"
            )
        check_counts(batch_size=self.batch_size, max_length=self.max_length, eval_batch_size=self.eval_batch_size,
                     max_samples=self.max_samples)
        for flag, value in {"--grad-accum-steps": self.grad_accum_steps, "--lora-r": self.lora_r,
                            "--steps": self.steps, "--epochs": self.epochs, "--stop-after": self.stop_after,
                            "--eval-every": self.eval_every}.items():
            check_at_least(flag, value, 1)
        if self.steps is not None and self.epochs is not None:
            raise UserError("give --steps or --epochs, not both")
        if self.warmup_epochs is not None and (self.warmup_epochs < 0 or self.warmup_steps):
            raise UserError("--warmup-epochs must be non-negative and not given with --warmup-steps")
        if not 0.0 <= self.eval_split < 1.0:
            raise UserError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        check_positive("--lr", self.lr)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler not in SCHEDULERS:
            raise UserError(f"unknown --lr-scheduler {self.lr_scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.cb_variant not in CB_VARIANTS:
            raise UserError(f"unknown --cb-variant {self.cb_variant!r}; choose one of {', '.join(CB_VARIANTS)}")
        if self.lat_norm not in LAT_NORMS:
            raise UserError(f"unknown --lat-norm {self.lat_norm!r}; choose one of {', '.join(LAT_NORMS)}")
        if self.adversary is not None and self.adversary not in ADVERSARIES:
            raise UserError(f"unknown --adversary {self.adversary!r}; choose one of {', '.join(ADVERSARIES)}")
        if self.lat_defender not in LAT_DEFENDERS:
            raise UserError(f"unknown --lat-defender {self.lat_defender!r}; choose one of {', '.join(LAT_DEFENDERS)}")
        check_positive("--adversary-lr", self.adversary_lr)
        check_rule(self.lora_targets)
        if self.rr_retain_mean not in RR_RETAIN_MEANS:
            raise UserError(f"unknown --rr-retain-mean {self.rr_retain_mean!r}; choose one of {', '.join(RR_RETAIN_MEANS)}")
        for flag, value in {"--lat-toward-coef": self.lat_toward_coef, "--lat-sft-coef": self.lat_sft_coef,
                            "--adversary-away-coef": self.adversary_away_coef}.items():
            check_at_least(flag, value, 0)
        if self.target_layers or self.layer_id is not None:  # known before the model loads
            self._check_upstream(min(self.target_layers or [self.layer_id]))
        if self.lat_eps < 0 or self.lat_steps < 0:
            raise UserError("--lat-eps and --lat-steps must be non-negative")
        if self.wt_noise_std < 0:
            raise UserError(f"--wt-noise-std must be non-negative, got {self.wt_noise_std}")
        check_positive("--beta", self.beta)
        if self.grad_clip < 0:
            raise UserError(f"--grad-clip must be non-negative (0 disables), got {self.grad_clip}")
        if self.wandb_project and self.wandb and not self.wandb_project.strip():
            raise UserError("--wandb-project must not be empty")

    def apply_preset(self, explicit: set[str]) -> dict[str, Any]:
        """Set this run's values from ``--preset`` (``self.preset``); the fields named in
        ``explicit`` (given on the command line) keep their values. Returns the preset's values."""
        from unlearn_lens.unlearning import presets

        values = presets.resolve(self.method, self.preset, {name: getattr(self, name) for name in explicit})
        for name, value in values.items():
            setattr(self, name, list(value) if isinstance(value, list) else value)
        chosen = dict(presets.get(self.method, self.preset).values)
        self.extra["preset_values"] = chosen
        return chosen

    def resolve_layers(self, num_layers: int) -> None:
        """Fill layer defaults from the model depth and check every layer index is in range.

        Default ``--layer-id`` is 7 (WMDP's RMU setting) or the last block of a shallower model;
        target layers default to ``[layer_id]``; RMU updates layers ``layer_id-2 .. layer_id``.
        """
        def check(flag: str, layer: int) -> None:
            if not 0 <= layer < num_layers:
                raise UserError(f"{flag} {layer} is out of range: the model has layers 0..{num_layers - 1}")

        from unlearn_lens.unlearning.presets import scale_layers

        for name in self.depth_scaled:  # a preset's layers, chosen on a 32-layer model (scaled once)
            value = getattr(self, name)
            self.extra.setdefault("depth_scaled_from", {})[name] = value
            if isinstance(value, int):
                setattr(self, name, scale_layers([value], num_layers)[0])
            elif value is not None:
                setattr(self, name, scale_layers(list(value), num_layers))
        self.depth_scaled = []

        if self.layer_id is None:
            self.layer_id = min(7, num_layers - 1)
        check("--layer-id", self.layer_id)
        if self.target_layers is None:
            self.target_layers = [self.layer_id]
        for layer in self.target_layers:
            check("--target-layers", layer)
        if self.update_layers is None and self.method == "rmu":
            self.update_layers = list(range(max(0, self.layer_id - 2), self.layer_id + 1))
        if self.update_roles is None and self.method == "rmu":
            self.update_roles = ["down"]
        for layer in self.update_layers or []:
            check("--update-layers", layer)
        if self.method in ("lat", "cb_lat"):
            self._resolve_adversary(num_layers)

    def _resolve_adversary(self, num_layers: int) -> None:
        """Fill the adversary's defaults and check its layers (-1 is the embedding output).

        lat: ``pgd`` at the middle target layer (the original pipeline's). cb_lat: deep
        ignorance's ``combined`` adversary at the embedding output, the one layer of the
        reference's attack strictly before every scored layer. cb_lat's adversary layers must lie
        strictly before the first target layer, so that the blocks between them and the scored
        activations can learn to resist it; the one exception is ``--adversary pgd`` with no
        ``--adversary-layers``, the original pipeline's placement (the middle target layer itself),
        kept for ``--preset original``.
        """
        if self.adversary is None:
            self.adversary = "pgd" if self.method == "lat" else "combined"
        if self.adversary_lr is None and self.adversary != "pgd":
            self.adversary_lr = DEFAULT_ADVERSARY_LR[self.adversary]
        explicit = self.adversary_layers is not None
        if not explicit:
            middle = [self.adversary_layer]
            self.adversary_layers = middle if self.method == "lat" or self.adversary == "pgd" else [-1]
        for layer in self.adversary_layers:
            if not -1 <= layer < num_layers:
                raise UserError(f"--adversary-layers {layer} is out of range: the model has layers 0..{num_layers - 1} "
                                "(-1: the embedding output)")
        if len(set(self.adversary_layers)) != len(self.adversary_layers):
            raise UserError(f"--adversary-layers has a repeated layer: {self.adversary_layers}")
        if self.adversary == "pgd" and len(self.adversary_layers) != 1:
            raise UserError("--adversary pgd perturbs one layer; give one --adversary-layers value "
                            "(targeted and combined take several)")
        if explicit:
            self._check_upstream(min(self.target_layers))

    def _check_upstream(self, first_target: int) -> None:
        """cb_lat: explicit adversary layers must lie strictly before the first scored layer, except
        the original pipeline's placement (pgd at the middle target layer: a resolved config
        validates again)."""
        original = self.adversary in (None, "pgd") and self.adversary_layers == [self.adversary_layer]
        if (self.method == "cb_lat" and self.adversary_layers and not original
                and max(self.adversary_layers) >= first_target):
            raise UserError(f"cb_lat: --adversary-layers must lie strictly before the first target layer "
                            f"{first_target} (got {self.adversary_layers}); -1 is the embedding output")

    @property
    def adversary_layer(self) -> int:
        """The original pipeline's LAT injection point: the middle of the target layers."""
        layers = sorted(self.target_layers or [self.layer_id or 0])
        return layers[len(layers) // 2]
