"""One object per unlearning method: its setup (targets, noise, frozen copies) and its loss.

Every method gets a ``MethodContext`` (the model used for trained forward passes, the adapter
to find its blocks, an optional frozen reference, the run config) and returns, per step, the
scalar loss to minimise and the metrics to log (always ``forget_loss`` and ``retain_loss``
where they exist). Defaults are the original pipeline's losses; where the published reference
code differs, the reference is a flag (``--cb-variant rr``, ``--adversary``, ``--lat-defender``)
and a preset (``unlearning/presets/``). ``--forget-weight`` weighs the forget term of grad_diff,
dpo, npo and simnpo (open-unlearning's gamma).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from unlearn_lens.unlearning import losses as L
from unlearn_lens.unlearning.adversary import adamw_perturbation, align, pgd_perturbation
from unlearn_lens.unlearning.config import UnlearnConfig
from unlearn_lens.unlearning.hooks import StopForward, tap_blocks

Batch = dict[str, torch.Tensor]


@contextmanager
def eval_mode(model):
    """Dropout off for the enclosed passes, the model's mode restored after (the references'
    ``model.eval()`` ... ``model.train()`` around their frozen passes and attacks)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Reference:
    """The frozen original model: a frozen copy, or (LoRA) the same model with adapters off.

    Its passes run in eval mode even when training runs with dropout (``--train-dropout``), as
    GraySwan's and deep ignorance's frozen passes (``disable_adapter`` + ``model.eval()``)."""

    def __init__(self, model, adapter, disable: Callable[[], Any] | None = None,
                 autocast: Callable[[], Any] | None = None):
        self.model = model
        self.adapter = adapter
        self._disable = disable or nullcontext
        self._autocast = autocast or nullcontext  # the trained forwards' mixed precision

    @torch.no_grad()
    def __call__(self, batch: Batch, capture=(), hidden_only: bool = False):
        with self._disable(), self._autocast(), eval_mode(self.model):
            logits, hidden = forward(self.model, self.adapter, batch, capture, hidden_only=hidden_only)
        return logits, {k: v.detach() for k, v in hidden.items()}


@dataclass
class MethodContext:
    """What a method needs at each step."""

    config: UnlearnConfig
    model: Any  # the (possibly accelerate-wrapped) model whose parameters train
    adapter: Any  # ArchitectureAdapter on the underlying transformers model (for hooks)
    total_steps: int
    reference: Reference | None = None
    plain_model: Any = None  # the unwrapped model (no DDP hooks) for the LAT adversary
    hidden_size: int = 0
    early_stop: bool = True  # cut representation forwards after the last target layer (one process)
    sharded: bool = False  # FSDP: each process holds a shard of every parameter
    tokenizer: Any = None  # dpo: tokenizes its refusals


def forward(model, adapter, batch: Batch, capture=(), inject=None, hidden_only: bool = False):
    """Run ``model`` on a batch, returning ``(logits, {layer: hidden})`` from the block hooks.

    ``hidden_only`` stops after the last captured block (logits are then ``None``).
    """
    stop_after = max(capture) if hidden_only and capture else None
    logits = None
    with tap_blocks(adapter, capture, inject, stop_after=stop_after) as hidden:
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        except StopForward:
            pass
    return logits, dict(hidden)


def nll(model, adapter, batch: Batch, inject=None) -> torch.Tensor:
    logits, _ = forward(model, adapter, batch, inject=inject)
    return L.mean_token_nll(logits, batch["input_ids"], batch["attention_mask"])


class UnlearningMethod:
    """Base class: ``loss(forget, retain, step) -> (loss, metrics)``."""

    name = ""

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.cfg = ctx.config

    def _nll(self, batch: Batch, inject=None) -> torch.Tensor:
        return nll(self.ctx.model, self.ctx.adapter, batch, inject)

    def loss(self, forget: Batch, retain: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def loss_weights(self) -> dict[str, Any] | None:
        """The weights of the loss's terms as this run applies them (``config.json``
        ``resolved.loss_weights``); None where the flags say it all."""
        return None


def _f(value: torch.Tensor) -> float:
    return float(value.detach())


class GASimple(UnlearningMethod):
    name = "ga_simple"

    def loss(self, forget, retain, step):
        forget_nll = self._nll(forget)
        return -forget_nll, {"forget_loss": _f(forget_nll)}


class GA(UnlearningMethod):
    name = "ga"

    def loss(self, forget, retain, step):
        forget_nll, retain_nll = self._nll(forget), self._nll(retain)
        return -forget_nll + retain_nll, {"forget_loss": _f(forget_nll), "retain_loss": _f(retain_nll)}


class GradDiff(UnlearningMethod):
    name = "grad_diff"

    def loss(self, forget, retain, step):
        forget_nll, retain_nll = self._nll(forget), self._nll(retain)
        loss = retain_nll - self.cfg.forget_weight * forget_nll
        return loss, {"forget_loss": _f(forget_nll), "retain_loss": _f(retain_nll)}


class DPO(UnlearningMethod):
    """A refusal preferred over the forget continuation (pairs: ``dpo_pairs``), summed log-probs
    over the continuation, frozen reference; plus retain NLL (open-unlearning's ``DPO``)."""

    name = "dpo"

    def __init__(self, ctx):
        super().__init__(ctx)
        from unlearn_lens.unlearning import dpo_pairs

        if ctx.tokenizer is None:
            raise ValueError("dpo needs the tokenizer (MethodContext.tokenizer) to build its refusals")
        self.refusals = dpo_pairs.refusal_token_ids(ctx.tokenizer)
        self.pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self._build = dpo_pairs.build_pairs

    def loss(self, forget, retain, step):
        win, lose = self._build(forget["input_ids"], forget["attention_mask"], self.refusals, self.generator,
                                self.pad_id)
        w_logits, _ = forward(self.ctx.model, self.ctx.adapter, win)
        l_logits, _ = forward(self.ctx.model, self.ctx.adapter, lose)
        w_ref, _ = self.ctx.reference(win)
        l_ref, _ = self.ctx.reference(lose)
        lp = lambda logits, b: L.labelled_logprob(logits, b["input_ids"], b["labels_mask"])  # noqa: E731
        preference = L.dpo_loss(lp(w_logits, win), lp(w_ref, win), lp(l_logits, lose), lp(l_ref, lose),
                                self.cfg.beta)
        retain_nll = self._nll(retain)
        loss = self.cfg.forget_weight * preference + retain_nll
        return loss, {
            "forget_loss": _f(L.mean_token_nll(l_logits, forget["input_ids"], forget["attention_mask"])),
            "retain_loss": _f(retain_nll), "preference_loss": _f(preference)}


class NPO(UnlearningMethod):
    """NPO on summed sequence log-probabilities (the paper's) plus retain NLL."""

    name = "npo"

    def loss(self, forget, retain, step):
        f_logits, _ = forward(self.ctx.model, self.ctx.adapter, forget)
        f_ref, _ = self.ctx.reference(forget)
        ids, mask = forget["input_ids"], forget["attention_mask"]
        npo = L.npo_loss(L.sequence_logprob(f_logits, ids, mask), L.sequence_logprob(f_ref, ids, mask),
                         self.cfg.beta)
        retain_nll = self._nll(retain)
        return self.cfg.forget_weight * npo + retain_nll, {"forget_loss": _f(L.mean_token_nll(f_logits, ids, mask)),
                                  "retain_loss": _f(retain_nll), "npo_loss": _f(npo)}


class SimNPO(UnlearningMethod):
    """SimNPO on length-normalised log-probabilities (reference-free) plus retain NLL."""

    name = "simnpo"

    def loss(self, forget, retain, step):
        f_logits, _ = forward(self.ctx.model, self.ctx.adapter, forget)
        ids, mask = forget["input_ids"], forget["attention_mask"]
        simnpo = L.simnpo_loss(L.sequence_logprob(f_logits, ids, mask, normalise=True), self.cfg.beta)
        retain_nll = self._nll(retain)
        return self.cfg.forget_weight * simnpo + retain_nll, {"forget_loss": _f(L.mean_token_nll(f_logits, ids, mask)),
                                     "retain_loss": _f(retain_nll), "simnpo_loss": _f(simnpo)}


class _Representation(UnlearningMethod):
    """Shared by rmu / cb / cb_lat: random targets per layer, frozen retain activations."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.layers = list(self.cfg.target_layers)
        self.targets = L.uniform_unit_targets(self.layers, ctx.hidden_size, self.cfg.steering_coeff,
                                              self.cfg.seed)

    def _target(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        return self.targets[layer].to(device=like.device)

    def _representation_loss(self, forget, retain, step, inject=None, retain_inject=None):
        cfg = self.cfg
        if self.name in ("cb", "cb_lat") and cfg.cb_variant == "rr":
            return self._rr_loss(forget, retain, step, inject, retain_inject)
        ctx = self.ctx
        cut = ctx.early_stop
        _, f_hidden = forward(ctx.model, ctx.adapter, forget, self.layers, inject, hidden_only=cut)
        _, r_hidden = forward(ctx.model, ctx.adapter, retain, self.layers, retain_inject, hidden_only=cut)
        _, r_frozen = ctx.reference(retain, self.layers, hidden_only=True)
        total, forget_terms, retain_terms = 0.0, [], []
        for layer in self.layers:
            fn = L.rmu_loss if self.name == "rmu" else L.cb_loss
            term, f_term, r_term = fn(f_hidden[layer], forget["attention_mask"],
                                      self._target(layer, f_hidden[layer]), r_hidden[layer],
                                      r_frozen[layer], retain["attention_mask"], cfg.alpha)
            total = total + term
            forget_terms.append(_f(f_term))
            retain_terms.append(_f(r_term))
        return total, {"forget_loss": sum(forget_terms) / len(forget_terms),
                       "retain_loss": sum(retain_terms) / len(retain_terms)}

    def _rr_layers_and_schedule(self):
        """cb: GraySwan's retain anchor (every block up to the last target) and schedule;
        cb_lat: deep ignorance's (every block; its RRTrainer schedule)."""
        if self.name == "cb":
            return list(range(max(self.layers) + 1)), L.rr_coefficients_circuit_breakers
        return list(range(self.ctx.adapter.num_layers)), L.rr_coefficients_deep_ignorance

    def loss_weights(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.name in ("cb", "cb_lat") and cfg.cb_variant == "rr":
            schedule = ("c_rr = a (1 - t/2T), c_retain = a t/2T, t from 1" if self.name == "cb"
                        else "s = min(1, t/T), c_rr = a (1 - s/4), c_retain = a s, t from 0")
            weights = {"retain_coef": cfg.alpha, "remove_coef": cfg.alpha * cfg.forget_weight, "schedule": schedule,
                       "retain_mean": cfg.rr_retain_mean}
        else:
            weights = {"forget": 1.0, "retain": cfg.alpha}
        if self.name == "cb_lat":
            weights["adversary"] = adversary_weights(cfg)
        return weights

    def _rr_loss(self, forget, retain, step, inject=None, retain_inject=None):
        """Representation rerouting, terms averaged over layers: GraySwan
        ``src/lorra_circuit_breaker.py`` ``compute_loss`` (cb), deep ignorance
        ``unlearn/reference/cas/unlearning.py`` ``RRTrainer.compute_loss`` (cb_lat). The frozen
        activations are clean (the reference computes them before the attack). ``--forget-weight``
        scales the rerouting coefficient: deep ignorance weighs its two terms separately
        (``--remove_coef`` 300, ``--retain_coef`` 5 in ``rr-lat.sh``: alpha 5, forget weight 60).
        ``--rr-retain-mean padded`` divides the retain term's sum over real tokens by every
        position of the batch padded to ``--max-length``, as the references' ``nanmean`` over
        their padded batches does."""
        ctx, cfg = self.ctx, self.cfg
        cut = ctx.early_stop
        retain_layers, schedule = self._rr_layers_and_schedule()
        c_rr, c_retain = schedule(step, ctx.total_steps, cfg.alpha)
        c_rr = cfg.forget_weight * c_rr  # deep ignorance's remove_coef / retain_coef (1 in GraySwan's)
        _, f_hidden = forward(ctx.model, ctx.adapter, forget, self.layers, inject, hidden_only=cut)
        _, r_hidden = forward(ctx.model, ctx.adapter, retain, retain_layers, retain_inject, hidden_only=cut)
        _, f_frozen = ctx.reference(forget, self.layers, hidden_only=True)
        _, r_frozen = ctx.reference(retain, retain_layers, hidden_only=True)
        loss, f_term, r_term = L.rr_layer_mean_loss(
            [f_hidden[i] for i in self.layers], [f_frozen[i] for i in self.layers], forget["attention_mask"],
            [r_hidden[i] for i in retain_layers], [r_frozen[i] for i in retain_layers], retain["attention_mask"],
            c_rr, c_retain, retain_positions=cfg.max_length if cfg.rr_retain_mean == "padded" else None)
        return loss, {"forget_loss": _f(f_term), "retain_loss": _f(r_term), "c_rr": c_rr, "c_retain": c_retain}


class RMU(_Representation):
    name = "rmu"

    def loss(self, forget, retain, step):
        return self._representation_loss(forget, retain, step)


class CB(_Representation):
    name = "cb"

    def loss(self, forget, retain, step):
        return self._representation_loss(forget, retain, step)


@dataclass
class Attack:
    """A fitted adversary: the injection for the forget batch it was fitted on and, for the
    batch-independent ``combined`` adversary, a way to inject it into any other batch."""

    forget: dict[int, torch.Tensor]
    perturbation: Any = None  # adversary.Perturbation (targeted / combined)
    metrics: dict[str, float] | None = None

    def for_batch(self, batch: Batch) -> dict[int, torch.Tensor] | None:
        """The injection for another batch: only the combined adversary applies to any batch."""
        if self.perturbation is None or self.perturbation.kind != "combined":
            return None
        return self.perturbation.inject(batch["input_ids"].shape[1])

    def paired(self, batch: Batch) -> dict[int, torch.Tensor]:
        """The injection for the other text of each forget/retain pair, as targeted LAT applies
        its attack to the retain text (``adversary.Perturbation.paired``; pgd alike)."""
        seq = batch["input_ids"].shape[1]
        if self.perturbation is not None:
            return self.perturbation.paired(seq)
        return {layer: align(delta, seq) for layer, delta in self.forget.items()}


def normalised(weights: dict[str, float]) -> dict[str, float]:
    """Targeted LAT's ``normalize_dict``: each weight over their sum."""
    total = sum(weights.values())
    return {key: value / total for key, value in weights.items()}


def adversary_weights(cfg: UnlearnConfig) -> dict[str, float]:
    """The adversary's objective: forget NLL ("toward", weight 1) and, with
    ``--adversary-away-coef``, -log(1 - p) on the retain text under the attack ("away"), normalised."""
    return normalised({"toward": 1.0, "away": cfg.adversary_away_coef})


def fit_attack(ctx: MethodContext, forget: Batch, retain: Batch | None = None) -> Attack:
    """Fit the configured adversary (``--adversary``) on the forget batch: it lowers the forget NLL
    by perturbing the residual stream at ``--adversary-layers``; with ``--adversary-away-coef`` and
    a ``retain`` batch it also lowers log(1 - p) of the retain text under the same attack
    (targeted LAT's ``adv_loss_coefs`` toward / away, ``Attack.paired``). Metrics: the clean forget
    NLL (``adversary_start_nll``) and the one before its last update (``adversary_nll``)."""
    cfg = ctx.config
    model = ctx.plain_model if ctx.plain_model is not None else ctx.model
    ids = forget["input_ids"]
    shape = (ids.shape[0], ids.shape[1], ctx.hidden_size)
    weights = adversary_weights(cfg) if retain is not None else {"toward": 1.0, "away": 0.0}
    if weights["away"] and retain["input_ids"].shape[0] != ids.shape[0]:
        raise ValueError("the adversary's away term pairs forget and retain texts: give batches of one size")
    forget_nlls: list[float] = []
    away_losses: list[float] = []

    def objective(forget_inject, retain_inject):
        forget_nll = nll(model, ctx.adapter, forget, inject=forget_inject)
        forget_nlls.append(float(forget_nll.detach()))
        if not weights["away"]:
            return forget_nll
        logits, _ = forward(model, ctx.adapter, retain, inject=retain_inject())
        away = L.log_one_minus_p_loss(logits, retain["input_ids"], retain["attention_mask"])
        away_losses.append(float(away.detach()))
        return weights["toward"] * forget_nll + weights["away"] * away

    retain_seq = retain["input_ids"].shape[1] if retain is not None else 0
    if cfg.adversary == "pgd":
        layer = cfg.adversary_layers[0]
        delta, _ = pgd_perturbation(
            lambda d: objective({layer: d}, lambda: {layer: align(d, retain_seq)}), shape, forget["attention_mask"],
            eps=cfg.lat_eps, steps=cfg.lat_steps, norm=cfg.lat_norm, step_size=cfg.lat_step_size, device=ids.device)
        attack = Attack({layer: delta})
    else:
        perturbation, _ = adamw_perturbation(
            lambda p: objective(p.inject(ids.shape[1]), lambda: p.paired(retain_seq)), cfg.adversary,
            cfg.adversary_layers, shape, forget["attention_mask"], steps=cfg.lat_steps, lr=cfg.adversary_lr,
            eps=cfg.lat_eps, device=ids.device)
        attack = Attack(perturbation.inject(ids.shape[1]), perturbation)
    attack.metrics = {}
    if forget_nlls:
        attack.metrics = {"adversary_start_nll": forget_nlls[0], "adversary_nll": forget_nlls[-1]}
    if away_losses:
        attack.metrics["adversary_away_loss"] = away_losses[-1]
    return attack


class LAT(UnlearningMethod):
    """Latent adversarial training: the adversary lowers forget NLL, then the defender trains.

    ``--lat-defender ascent`` (the original pipeline's): -NLL(forget | adversary) + NLL(retain).
    ``away`` (targeted LAT, aengusl/latent-adversarial-training ``latent_at/lat_helpers.py``
    ``do_defense_step`` / ``compute_toward_away_loss``, data from ``lat_datasets.py``
    ``load_targeted_wmdp_data``: the defender's "toward" text is the retain text): the retain
    NLL under the adversary ("toward", ``--lat-toward-coef``), the bounded away loss
    -log(1 - p) on the forget text under the adversary ("away", 1) and the retain NLL without it
    ("sft", ``--lat-sft-coef``), normalised by the sum of the coefficients (``normalize_dict``;
    toward 1, away 1, sft 4 in the WMDP notebook). The adversary's own objective:
    ``adversary_weights`` (``--adversary-away-coef``).
    """

    name = "lat"

    def loss_weights(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.lat_defender == "away":
            defender = normalised({"toward": cfg.lat_toward_coef, "away": 1.0, "sft": cfg.lat_sft_coef})
        else:
            defender = {"forget_ascent": 1.0, "retain": 1.0}
        return {"defender": defender, "adversary": adversary_weights(cfg)}

    def loss(self, forget, retain, step):
        attack = fit_attack(self.ctx, forget, retain)
        retain_nll = self._nll(retain)
        if self.cfg.lat_defender == "away":
            weights = self.loss_weights()["defender"]
            logits, _ = forward(self.ctx.model, self.ctx.adapter, forget, inject=attack.forget)
            away = L.log_one_minus_p_loss(logits, forget["input_ids"], forget["attention_mask"])
            loss = weights["away"] * away + weights["sft"] * retain_nll
            forget_nll = L.mean_token_nll(logits, forget["input_ids"], forget["attention_mask"])
            metrics = {"forget_loss": _f(forget_nll), "retain_loss": _f(retain_nll), "away_loss": _f(away)}
            if weights["toward"]:
                toward = self._nll(retain, attack.paired(retain))
                loss = loss + weights["toward"] * toward
                metrics["toward_loss"] = _f(toward)
            return loss, {**metrics, **attack.metrics}
        forget_nll = self._nll(forget, attack.forget)
        return -forget_nll + retain_nll, {"forget_loss": _f(forget_nll), "retain_loss": _f(retain_nll),
                                          **attack.metrics}


class CBLAT(_Representation):
    """Circuit-breaker loss with the trained forward passes run under the LAT adversary.

    The adversary sits at ``--adversary-layers`` (default: the embedding output), strictly
    before the first scored layer, so every block between it and the scored activations learns
    to resist it; the batch-independent ``combined`` adversary (deep ignorance's) stays on for the
    retain pass too, as in EleutherAI/unlearn ``unlearn/reference/cas/unlearning.py``
    ``RRTrainer.compute_loss`` (its hooks are cleared only after the loss).
    """

    name = "cb_lat"

    def loss(self, forget, retain, step):
        model = self.ctx.plain_model if self.ctx.plain_model is not None else self.ctx.model
        with eval_mode(model):  # deep ignorance's gradient_descent_attack: model.eval(), dropout off
            attack = fit_attack(self.ctx, forget, retain)
        loss, metrics = self._representation_loss(forget, retain, step, attack.forget, attack.for_batch(retain))
        return loss, {**metrics, **attack.metrics}


@torch.no_grad()
def add_weight_noise(model, std: float, seed: int) -> float:
    """wt_dist's start: theta += N(0, std^2) on every parameter (tied ones once); returns the
    empirical std of all the noise drawn. The seeded CPU generator makes every process agree."""
    generator = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for _, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        param.add_(noise.to(device=param.device, dtype=param.dtype))
        total += float(noise.sum())
        total_sq += float(noise.pow(2).sum())
        count += noise.numel()
    mean = total / count
    return (total_sq / count - mean * mean) ** 0.5


class WtDist(UnlearningMethod):
    """Retain fine-tuning after the weight noise (applied by the trainer before training)."""

    name = "wt_dist"

    def loss(self, forget, retain, step):
        retain_nll = self._nll(retain)
        with torch.no_grad():
            forget_nll = self._nll(forget)
        return retain_nll, {"forget_loss": _f(forget_nll), "retain_loss": _f(retain_nll)}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard: FSDP2 parameters are DTensors, FSDP1's (orig params) plain views."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class WtDistReg(UnlearningMethod):
    """Retain NLL minus lambda times the RMS distance from the pretrained weights."""

    name = "wt_dist_reg"

    def __init__(self, ctx):
        super().__init__(ctx)
        model = ctx.plain_model if ctx.plain_model is not None else ctx.model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pretrained = [p.detach().clone() for p in self.params]
        self._count: torch.Tensor | None = None  # parameters over all shards (FSDP), summed once

    def _distance(self) -> torch.Tensor:
        if not self.ctx.sharded:
            return L.rms_distance(self.params, self.pretrained, eps=self.cfg.wt_reg_eps)
        # FSDP: sum the squared differences of every shard across processes. The gradient must
        # reach each shard once, from its own process (every process's loss holds the same
        # distance; a differentiable all-reduce would hand each shard world_size times the term).
        import torch.distributed as dist

        pairs = [(_local(p), _local(r)) for p, r in zip(self.params, self.pretrained)]
        local = sum(((p.float() - r.float()).pow(2).sum() for p, r in pairs),
                    torch.zeros((), device=pairs[0][1].device))
        if self._count is None:
            self._count = torch.tensor(float(sum(p.numel() for p, _ in pairs)), device=local.device)
            dist.all_reduce(self._count)
        count = self._count
        total = local.detach().clone()
        dist.all_reduce(total)
        total = local + (total - local.detach())  # the global sum's value, this shard's gradient
        return torch.sqrt(total / count + self.cfg.wt_reg_eps)

    def loss(self, forget, retain, step):
        retain_nll = self._nll(retain)
        distance = self._distance()
        with torch.no_grad():
            forget_nll = self._nll(forget)
        return retain_nll - self.cfg.wt_reg_lambda * distance, {
            "forget_loss": _f(forget_nll), "retain_loss": _f(retain_nll), "weight_rms_distance": _f(distance)}


METHOD_CLASSES: dict[str, type[UnlearningMethod]] = {
    cls.name: cls for cls in (GASimple, GA, GradDiff, DPO, NPO, SimNPO, RMU, CB, LAT, CBLAT, WtDist, WtDistReg)
}


def build_method(ctx: MethodContext) -> UnlearningMethod:
    return METHOD_CLASSES[ctx.config.method](ctx)
