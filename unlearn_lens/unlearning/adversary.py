"""LAT's inner loop: an adversary on the residual stream that helps the model recall the forget text.

Three adversaries (``--adversary``):

- ``pgd`` (the original pipeline's): one per-token perturbation at one layer, signed-gradient
  steps in an L-infinity ball (``--lat-norm linf``) or normalised-gradient steps in a per-token
  L2 ball (``l2``), ``pgd_perturbation``.
- ``targeted`` (targeted LAT, Sheshadri et al. 2024; aengusl/latent-adversarial-training
  ``latent_at/laa/attacks.py`` ``GDAdversary`` driven by ``latent_at/lat_methods.py``
  ``projected_gradient_descent``): a per-token perturbation at each adversary layer, zero at
  padding, optimised by ``torch.optim.AdamW`` (its defaults: weight decay 0.01) and clipped after
  every step to the per-token L2 ball of radius ``eps`` (``GDAdversary.clip_attack``).
- ``combined`` (deep ignorance's rr-lat, EleutherAI/unlearn ``unlearn/reference/cas/unlearning.py``
  ``CombinedAdversary`` driven by ``gradient_descent_attack``): at each adversary layer one
  steering vector added at every position plus a 32-token soft prefix added at the first
  positions, both shared by every sequence, unbounded, optimised by AdamW. Because it does not
  depend on the batch it can stay on for other batches (the reference keeps it on for the retain
  pass).

Targeted LAT's adversary also has an "away" term, -log(1 - p) on the retain text under the
same attack (``--adversary-away-coef``; the objective is built in ``methods.fit_attack``): its
per-token attack is applied at the forget text's real-token positions of whatever text passes
through, since the reference pads each forget/retain pair to one length (``Perturbation.paired``).

Only the perturbation receives gradients (``torch.autograd.grad`` on it alone); the model's
parameters are untouched. (The reference loops call ``loss.backward()``, which also leaves the
adversary's gradients, lowering forget NLL, in the trainable parameters' ``.grad``; we do not.)
"""

from __future__ import annotations

from typing import Callable

import torch

#: CombinedAdversary's soft-prefix length (``self.sp_size = 32`` in the reference).
SOFT_PREFIX_TOKENS = 32


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s 2.5 * eps / steps: enough to reach the boundary of the ball."""
    return 2.5 * eps / max(steps, 1)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the L-infinity ball or, per token, onto the L2 ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(eps / norms, max=1.0)


def pgd_perturbation(loss_fn: Callable[[torch.Tensor], torch.Tensor], shape, mask: torch.Tensor, *,
                     eps: float, steps: int, norm: str = "linf", step_size: float | None = None,
                     device=None, dtype=torch.float32) -> tuple[torch.Tensor, list[float]]:
    """Return ``(delta, losses)``: ``delta`` (batch, seq, hidden) lowering ``loss_fn(delta)``.

    ``mask`` (batch, seq) zeroes the perturbation on padding. ``losses`` are the adversary's
    objective at each step (before the update), for logging and tests.
    """
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    token_mask = mask.to(device=device, dtype=dtype).unsqueeze(-1)
    delta = torch.zeros(shape, device=device, dtype=dtype)
    losses = []
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(delta * token_mask)
        (grad,) = torch.autograd.grad(loss, delta)
        losses.append(float(loss.detach()))
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = project(delta - step_size * step, eps, norm) * token_mask
    return delta.detach(), losses


def align(tensor: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A (batch, seq, hidden) per-token tensor cut or zero-padded to ``seq_len`` positions."""
    if tensor.shape[1] >= seq_len:
        return tensor[:, :seq_len]
    pad = tensor.new_zeros(tensor.shape[0], seq_len - tensor.shape[1], tensor.shape[2])
    return torch.cat([tensor, pad], dim=1)


def clip_per_token(attack: torch.Tensor, eps: float) -> None:
    """``GDAdversary.clip_attack``: divide each token's vector by max(norm / eps, 1), in place."""
    with torch.no_grad():
        norms = torch.norm(attack, dim=-1, keepdim=True)
        attack.div_(torch.clamp(norms / eps, min=1))


class Perturbation:
    """The fitted adversary: ``inject(batch)`` gives ``{layer: tensor}`` for ``tap_blocks``.

    ``targeted`` holds one (batch, seq, hidden) tensor per layer and applies only to the batch it
    was fitted on (times its mask); ``combined`` holds ``sv`` (hidden,) and ``sp`` (1, 32, hidden)
    per layer and applies to any batch.
    """

    def __init__(self, kind: str, params: dict[int, dict[str, torch.Tensor]], mask: torch.Tensor | None = None):
        self.kind = kind
        self.params = params
        self.mask = mask

    def parameters(self) -> list[torch.Tensor]:
        return [t for layer in sorted(self.params) for _, t in sorted(self.params[layer].items())]

    def inject(self, seq_len: int | None = None) -> dict[int, torch.Tensor]:
        out = {}
        for layer, p in self.params.items():
            if self.kind == "targeted":
                out[layer] = p["attack"] * self.mask
            else:
                sv, sp = p["sv"], p["sp"]
                n = min(SOFT_PREFIX_TOKENS, seq_len)
                prefix = torch.zeros(1, seq_len, sv.shape[-1], device=sv.device, dtype=sv.dtype)
                prefix = torch.cat([sp[:, :n], prefix[:, n:]], dim=1)
                out[layer] = sv.view(1, 1, -1) + prefix
        return out

    def paired(self, seq_len: int) -> dict[int, torch.Tensor]:
        """The injection for the other text of each pair (row ``i`` with the fitted batch's row
        ``i``), ``seq_len`` positions: ``targeted`` at the fitted texts' real-token positions
        (zero beyond them), ``combined`` as for any batch."""
        if self.kind == "combined":
            return self.inject(seq_len)
        return {layer: align(delta, seq_len) for layer, delta in self.inject().items()}

    def detached(self) -> "Perturbation":
        params = {layer: {k: t.detach() for k, t in p.items()} for layer, p in self.params.items()}
        return Perturbation(self.kind, params, self.mask)


def adamw_perturbation(loss_fn: Callable[["Perturbation"], torch.Tensor], kind: str, layers, shape,
                       mask: torch.Tensor, *, steps: int, lr: float, eps: float | None = None, device=None,
                       dtype=torch.float32) -> tuple[Perturbation, list[float]]:
    """Fit a ``targeted`` or ``combined`` adversary with AdamW; return it and its losses.

    ``shape`` is the fitted batch's (batch, seq, hidden); ``loss_fn`` maps the live perturbation
    (``inject(seq)`` for the fitted batch, ``paired`` for another) to the adversary's objective.
    ``losses`` hold the objective before each update
    (the reference's logged values); ``targeted`` clips to ``eps`` after every update.
    """
    batch, seq, hidden = shape
    params: dict[int, dict[str, torch.Tensor]] = {}
    for layer in layers:
        if kind == "targeted":
            params[layer] = {"attack": torch.zeros(batch, seq, hidden, device=device, dtype=dtype)}
        elif kind == "combined":
            params[layer] = {"sv": torch.zeros(hidden, device=device, dtype=dtype),
                             "sp": torch.zeros(1, SOFT_PREFIX_TOKENS, hidden, device=device, dtype=dtype)}
        else:
            raise ValueError(f"unknown adversary {kind!r}")
    token_mask = mask.to(device=device, dtype=dtype).unsqueeze(-1) if kind == "targeted" else None
    adversary = Perturbation(kind, params, token_mask)
    tensors = adversary.parameters()
    for t in tensors:
        t.requires_grad_(True)
    optimizer = torch.optim.AdamW(tensors, lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(adversary)
        grads = torch.autograd.grad(loss, tensors)
        for t, g in zip(tensors, grads):
            t.grad = torch.where(torch.isnan(g), torch.zeros_like(g), g)  # the reference's zero_nan_grads
        losses.append(float(loss.detach()))
        optimizer.step()
        if kind == "targeted":
            for t in tensors:
                clip_per_token(t, eps)
    return adversary.detached(), losses
