"""LAT's inner loop: a PGD adversary on a block's hidden state that helps the model recall.

``linf`` is the original pipeline's signed-gradient step with an L-infinity ball; ``l2`` is the
reference targeted-LAT adversary: per-token L2-bounded perturbations, updated along the
per-token normalised gradient and projected back onto the ball. Only the perturbation receives
gradients (``torch.autograd.grad`` on it alone); the model's parameters are untouched.
"""

from __future__ import annotations

from typing import Callable

import torch


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
