"""One object per unlearning method: its setup (targets, noise, frozen copies) and its loss.

Every method gets a ``MethodContext`` (the model used for trained forward passes, the adapter
to find its blocks, an optional frozen reference, the run config) and returns, per step, the
scalar loss to minimise and the metrics to log (always ``forget_loss`` and ``retain_loss``
where they exist). Losses are those of the original pipeline; where the published reference
code differs, the variant is a flag (``--cb-variant rr``, ``--lat-norm l2``). ``--forget-weight``
weighs the forget term of grad_diff, dpo, npo and simnpo (open-unlearning's gamma).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from unlearn_lens.unlearning import losses as L
from unlearn_lens.unlearning.adversary import pgd_perturbation
from unlearn_lens.unlearning.config import UnlearnConfig
from unlearn_lens.unlearning.hooks import StopForward, tap_blocks

Batch = dict[str, torch.Tensor]


class Reference:
    """The frozen original model: a frozen copy, or (LoRA) the same model with adapters off."""

    def __init__(self, model, adapter, disable: Callable[[], Any] | None = None,
                 autocast: Callable[[], Any] | None = None):
        self.model = model
        self.adapter = adapter
        self._disable = disable or nullcontext
        self._autocast = autocast or nullcontext  # the trained forwards' mixed precision

    @torch.no_grad()
    def __call__(self, batch: Batch, capture=(), hidden_only: bool = False):
        with self._disable(), self._autocast():
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

    def _representation_loss(self, forget, retain, step, inject=None):
        cfg, ctx = self.cfg, self.ctx
        cut = ctx.early_stop
        _, f_hidden = forward(ctx.model, ctx.adapter, forget, self.layers, inject, hidden_only=cut)
        _, r_hidden = forward(ctx.model, ctx.adapter, retain, self.layers, hidden_only=cut)
        _, r_frozen = ctx.reference(retain, self.layers, hidden_only=True)
        total, forget_terms, retain_terms = 0.0, [], []
        rr = self.name in ("cb", "cb_lat") and cfg.cb_variant == "rr"
        if rr:
            _, f_frozen = ctx.reference(forget, self.layers, hidden_only=True)
            c_rr, c_retain = L.rr_coefficients(step, ctx.total_steps, cfg.alpha)
        for layer in self.layers:
            if rr:
                term, f_term, r_term = L.rr_loss(f_hidden[layer], f_frozen[layer], forget["attention_mask"],
                                                 r_hidden[layer], r_frozen[layer], retain["attention_mask"],
                                                 c_rr, c_retain)
            else:
                fn = L.rmu_loss if self.name == "rmu" else L.cb_loss
                term, f_term, r_term = fn(f_hidden[layer], forget["attention_mask"],
                                          self._target(layer, f_hidden[layer]), r_hidden[layer],
                                          r_frozen[layer], retain["attention_mask"], cfg.alpha)
            total = total + term
            forget_terms.append(_f(f_term))
            retain_terms.append(_f(r_term))
        return total, {"forget_loss": sum(forget_terms) / len(forget_terms),
                       "retain_loss": sum(retain_terms) / len(retain_terms)}


class RMU(_Representation):
    name = "rmu"

    def loss(self, forget, retain, step):
        return self._representation_loss(forget, retain, step)


class CB(_Representation):
    name = "cb"

    def loss(self, forget, retain, step):
        return self._representation_loss(forget, retain, step)


def adversarial_delta(ctx: MethodContext, forget: Batch) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """Run the PGD adversary at the middle target layer: ``({layer: delta}, metrics)`` with the
    clean forget NLL (``adversary_start_nll``) and the one at its last step (``adversary_nll``)."""
    cfg = ctx.config
    layer = cfg.adversary_layer
    model = ctx.plain_model if ctx.plain_model is not None else ctx.model
    ids = forget["input_ids"]
    shape = (ids.shape[0], ids.shape[1], ctx.hidden_size)

    def adversary_objective(delta):
        return nll(model, ctx.adapter, forget, inject={layer: delta})

    delta, losses = pgd_perturbation(adversary_objective, shape, forget["attention_mask"], eps=cfg.lat_eps,
                                     steps=cfg.lat_steps, norm=cfg.lat_norm, step_size=cfg.lat_step_size,
                                     device=ids.device)
    if not losses:
        return {layer: delta}, {}
    return {layer: delta}, {"adversary_start_nll": losses[0], "adversary_nll": losses[-1]}


class LAT(UnlearningMethod):
    """Adversary lowers forget NLL at the middle target layer; defender ascends on it, descends on retain."""

    name = "lat"

    def loss(self, forget, retain, step):
        inject, adversary = adversarial_delta(self.ctx, forget)
        forget_nll = self._nll(forget, inject)
        retain_nll = self._nll(retain)
        return -forget_nll + retain_nll, {"forget_loss": _f(forget_nll), "retain_loss": _f(retain_nll),
                                          **adversary}


class CBLAT(_Representation):
    """Circuit-breaker loss with forget activations collected under the LAT adversary."""

    name = "cb_lat"

    def loss(self, forget, retain, step):
        inject, adversary = adversarial_delta(self.ctx, forget)
        loss, metrics = self._representation_loss(forget, retain, step, inject)
        return loss, {**metrics, **adversary}


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
