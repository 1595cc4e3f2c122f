"""Training the translators: KL(final || lens) per layer, and Adam on it over token minibatches.

The target of every layer is the model's own final next-token distribution (the lens at the last
layer, where the translator is the identity), so training needs only the residual stream
(L+1, n_tokens, d), wherever it came from (the model or the activation cache).
"""

from __future__ import annotations

import numpy as np

from unlearn_lens.core.errors import UserError


def _kl_final_lens(lens, hidden, layer: int, target_logp):
    import torch

    logp = torch.log_softmax(lens(hidden, layer), dim=-1)
    return (target_logp.exp() * (target_logp - logp)).sum(dim=-1).mean()


def kl_by_layer(lens, resid, *, device: str = "cpu", max_tokens: int = 1024, block: int = 512) -> np.ndarray:
    """Mean KL(final || lens) per layer (L+1,) over at most ``max_tokens`` tokens of ``resid``."""
    import torch

    resid = resid[:, :max_tokens]
    totals = np.zeros(lens.num_layers + 1)
    count = resid.shape[1]
    with torch.no_grad():
        for start in range(0, count, block):
            part = resid[:, start : start + block].to(device).float()
            target = torch.log_softmax(lens(part[-1], lens.num_layers), dim=-1)
            for layer in range(lens.num_layers + 1):
                totals[layer] += _kl_final_lens(lens, part[layer], layer, target).item() * part.shape[1]
    return totals / max(count, 1)


def train_tuned_lens(lens, resid, *, steps: int, lr: float = 1e-3, tokens_per_step: int = 512,
                     seed: int = 0, device: str = "cpu", progress=None) -> list[dict]:
    """Adam on sum over layers 0..L-1 of KL(final || lens) over random token minibatches.

    ``resid``: (L+1, n_tokens, d), any float dtype (cast per minibatch). Layers are back-propagated
    one at a time (the target is fixed), so memory holds one layer's logits. Returns the per-step log.
    """
    import torch

    if steps < 0:
        raise UserError(f"--steps must be >= 0, got {steps}")
    if resid.shape[1] == 0:
        raise UserError("no training tokens")
    lens.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.Adam([lens.weight, lens.bias], lr=lr)
    log = []
    for step in range(steps):
        index = torch.randint(resid.shape[1], (min(tokens_per_step, resid.shape[1]),), generator=generator)
        batch = resid[:, index].to(device).float()
        with torch.no_grad():
            target = torch.log_softmax(lens(batch[-1], lens.num_layers), dim=-1)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for layer in range(lens.num_layers):
            loss = _kl_final_lens(lens, batch[layer], layer, target)
            loss.backward()
            total += loss.item()
        optimizer.step()
        log.append({"step": step + 1, "mean_kl": total / max(lens.num_layers, 1)})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(mean_kl=f"{log[-1]['mean_kl']:.4f}")
    return log
