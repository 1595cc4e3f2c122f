"""Pure loss functions of the unlearning methods (tensors in, scalar tensor out).

Logit losses work on ``(logits, input_ids, attention_mask)``; the next-token targets and the
padding mask are derived here, in float32 for 16-bit and float32 models (float64 stays float64). Representation losses work
on hidden states ``(batch, seq, hidden)`` with the attention mask selecting real tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (16-bit activations are widened; float64 ones, as in the tests, kept)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Log-probability of every next token and the mask of real targets, both (batch, seq-1)."""
    logprobs = torch.log_softmax(_wide(logits[:, :-1]), dim=-1)
    targets = input_ids[:, 1:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = attention_mask[:, 1:].to(picked.dtype) * attention_mask[:, :-1].to(picked.dtype)
    return picked, mask


def mean_token_nll(logits, input_ids, attention_mask) -> torch.Tensor:
    """Mean negative log-likelihood over every real next-token position of the batch."""
    picked, mask = token_logprobs(logits, input_ids, attention_mask)
    return -(picked * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_logprob(logits, input_ids, attention_mask, *, normalise: bool = False) -> torch.Tensor:
    """Per-sequence log-probability: summed (NPO, DPO) or length-normalised (SimNPO)."""
    picked, mask = token_logprobs(logits, input_ids, attention_mask)
    total = (picked * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1.0) if normalise else total


def npo_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: -(2/beta) * mean log sigmoid(-beta * (log pi - log pi_ref)) on forget sequences."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - ref_logprob)).mean()


def simnpo_loss(avg_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """SimNPO (reference-free, no margin): -(2/beta) * mean log sigmoid(-beta * avg log pi)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * avg_logprob).mean()


def labelled_logprob(logits, input_ids, labels_mask) -> torch.Tensor:
    """Per-sequence log-probability summed over the tokens where ``labels_mask`` (batch, seq) is 1:
    open-unlearning's ``compute_batch_nll`` (labels -100 elsewhere), negated."""
    picked, _ = token_logprobs(logits, input_ids, labels_mask)
    return (picked * labels_mask[:, 1:].to(picked.dtype)).sum(-1)


def dpo_loss(win, win_ref, lose, lose_ref, beta: float) -> torch.Tensor:
    """DPO as open-unlearning's ``compute_dpo_loss``: -(2/beta) * mean log sigmoid(beta * margin),
    margin = (log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l)) on summed log-probs."""
    margin = (win - win_ref) - (lose - lose_ref)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token values (batch, seq) over the real tokens."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE (mean over hidden units) averaged over real tokens; ``target`` broadcasts."""
    per_token = (_wide(hidden) - _wide(target)).pow(2).mean(-1)
    return _masked_mean(per_token, mask)


def masked_cosine(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token, averaged over real tokens; ``target`` broadcasts."""
    cos = F.cosine_similarity(_wide(hidden), _wide(target).expand_as(hidden), dim=-1)
    return _masked_mean(cos, mask)


def rmu_loss(forget_hidden, forget_mask, control, retain_hidden, retain_frozen, retain_mask, alpha):
    """RMU at one layer: MSE(forget, c * u) + alpha * MSE(retain, frozen retain)."""
    forget = masked_mse(forget_hidden, control, forget_mask)
    retain = masked_mse(retain_hidden, retain_frozen, retain_mask)
    return forget + alpha * retain, forget, retain


def cb_loss(forget_hidden, forget_mask, control, retain_hidden, retain_frozen, retain_mask, alpha):
    """Original circuit breaker at one layer: -cos(forget, c*u) + alpha * (1 - cos(retain, frozen))."""
    forget = -masked_cosine(forget_hidden, control, forget_mask)
    retain = 1.0 - masked_cosine(retain_hidden, retain_frozen, retain_mask)
    return forget + alpha * retain, forget, retain


def rr_coefficients(step: int, total_steps: int, alpha: float) -> tuple[float, float]:
    """Representation-rerouting schedule: c_rr = a(1 - t/2T), c_retain = a t/2T."""
    fraction = step / (2.0 * max(total_steps, 1))
    return alpha * (1.0 - fraction), alpha * fraction


def rr_loss(forget_hidden, forget_frozen, forget_mask, retain_hidden, retain_frozen, retain_mask,
            c_rr: float, c_retain: float):
    """Circuit breakers' RR loss: c_rr ReLU(cos(h, h_frozen)) on forget + c_retain ||h - h_frozen|| on retain."""
    cos = F.cosine_similarity(forget_hidden.float(), forget_frozen.float(), dim=-1)
    forget = _masked_mean(torch.relu(cos), forget_mask)
    distance = (retain_hidden.float() - retain_frozen.float()).norm(dim=-1)
    retain = _masked_mean(distance, retain_mask)
    return c_rr * forget + c_retain * retain, forget, retain


def rr_coefficients_circuit_breakers(step: int, total_steps: int, alpha: float) -> tuple[float, float]:
    """GraySwan's schedule (``src/lorra_circuit_breaker.py`` ``compute_loss``): ``(c_rr, c_retain)``.

    ``progress = t / (2T)`` with ``t`` counted from 1 (``current_training_step`` is incremented
    before use; ``get_training_progress`` divides by 300 = 2 x max_steps 150);
    ``c_retain = alpha * progress``, ``c_rr = alpha * (1 - progress)``. ``step`` is 0-based.
    """
    progress = (step + 1) / (2.0 * max(total_steps, 1))
    return alpha * (1.0 - progress), alpha * progress


def rr_coefficients_deep_ignorance(step: int, total_steps: int, alpha: float) -> tuple[float, float]:
    """Deep ignorance's schedule (EleutherAI/unlearn ``unlearn/reference/cas/unlearning.py``
    ``RRTrainer.compute_loss``): ``(c_rr, c_retain)``.

    ``s = min(1, t / T)`` with ``t`` counted from 0 and ``T`` the steps of the (one-epoch) run;
    ``retain_coeff = retain_coef * s`` (0 -> 1) and ``circuit_breaker_coeff = remove_coef *
    (1 - 0.25 s)`` (1 -> 0.75); both coefficients are 5 there, ``alpha`` here.
    """
    s = min(1.0, step / max(total_steps, 1))
    return alpha * (1.0 - 0.25 * s), alpha * s


def _padded_mean(values: torch.Tensor, mask: torch.Tensor, positions: int) -> torch.Tensor:
    """Sum of per-token values (batch, seq) over real tokens / (batch x ``positions``): the mean
    over a batch padded to ``positions`` tokens whose padded values are zero."""
    if values.shape[1] > positions:
        raise ValueError(f"a batch of {values.shape[1]} positions cannot be padded to {positions}")
    return (values * mask.to(values.dtype)).sum() / (values.shape[0] * positions)


def rr_layer_mean_loss(forget_hidden, forget_frozen, forget_mask, retain_hidden, retain_frozen, retain_mask,
                       c_rr: float, c_retain: float, retain_positions: int | None = None):
    """RR over several layers, as GraySwan / deep ignorance stack them: ``(loss, forget, retain)``.

    ``forget_*`` and ``retain_*`` are lists of (batch, seq, hidden), one per layer (the forget
    list: the target layers; the retain list: every anchored layer). forget = mean over layers
    and real tokens of ReLU(cos(h, h_frozen)); retain = mean over layers and real tokens of
    ||h - h_frozen||_2, or with ``retain_positions`` = P the references' ``nanmean`` over a batch
    padded to P tokens (padded distances are zero: the sum over real tokens / (layers x batch x P),
    the token mean times the fill ratio); loss = c_rr * forget + c_retain * retain.
    """
    forget = torch.stack([_masked_mean(torch.relu(F.cosine_similarity(h.float(), f.float(), dim=-1)), forget_mask)
                          for h, f in zip(forget_hidden, forget_frozen)]).mean()
    if retain_positions is None:
        retain_mean = _masked_mean
    else:
        def retain_mean(values, mask):
            return _padded_mean(values, mask, retain_positions)
    retain = torch.stack([retain_mean((h.float() - f.float()).norm(dim=-1), retain_mask)
                          for h, f in zip(retain_hidden, retain_frozen)]).mean()
    return c_rr * forget + c_retain * retain, forget, retain


def log_one_minus_p_loss(logits, input_ids, attention_mask, threshold: float = -5.0) -> torch.Tensor:
    """Targeted LAT's bounded "away" loss (aengusl/latent-adversarial-training ``latent_at/utils.py``
    ``log_1_minus_p_loss``, from HarmBench): -mean over real next tokens of log(1 - p(token)).

    Computed as logsumexp over the other tokens minus logsumexp over all; tokens already unlikely
    (log p < ``threshold``) contribute 0 but still count in the mean, as in the reference.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].float() * attention_mask[:, :-1].float()
    log_sum_all = torch.logsumexp(logits, dim=-1)
    log_p = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_sum_all
    onehot = torch.zeros_like(logits).scatter_(-1, targets.unsqueeze(-1), 1.0)
    others = torch.logsumexp(logits * (1 - onehot) + onehot * (-1e10), dim=-1)
    log_1_minus_p = (others - log_sum_all) * (log_p >= threshold).float()
    return -(log_1_minus_p * mask).sum() / mask.sum().clamp_min(1.0)


def rms_distance(params, reference, eps: float = 1e-12) -> torch.Tensor:
    """Root-mean-square of (theta - theta_pretrained) over every scalar of ``params``.

    The size-independent distance of wt_dist_reg: lambda does not grow with the parameter count.
    ``eps`` keeps the gradient finite (zero) at the start, where the distance is zero.
    """
    total, count = None, 0
    for param, ref in zip(params, reference):
        term = (_wide(param) - _wide(ref)).pow(2).sum()
        total = term if total is None else total + term
        count += param.numel()
    if total is None:
        raise ValueError("no parameters")
    # eps: 1e-12 (original), 1e-8 in the reference code (vision_relearning vision_unlearner.py)
    return torch.sqrt(total / count + eps)


def uniform_unit_targets(layers, hidden_size: int, steering_coeff: float, seed: int):
    """WMDP's RMU control vectors: ``torch.rand`` normalised to unit norm, times the coefficient.

    One vector per target layer, drawn from a seeded CPU generator so every process agrees.
    """
    generator = torch.Generator().manual_seed(seed)
    targets = {}
    for layer in layers:
        vector = torch.rand(1, 1, hidden_size, generator=generator)
        targets[layer] = vector / vector.norm() * steering_coeff
    return targets


def cosine_schedule(step: int, total: int, warmup: int = 0, kind: str = "cosine") -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
