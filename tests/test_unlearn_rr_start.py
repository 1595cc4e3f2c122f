"""Why circuit breakers' rr loss moves slowly from a LoRA start (B = 0, so h == h_frozen).

The rerouting term ReLU(cos(h, h_frozen)) sits at its maximum there: its gradient vanishes and
grows only in proportion to the deviation, while the retain term ||h - h_frozen|| has a gradient
of unit norm per token however small the deviation. Near the start the retain anchor therefore
dominates any fixed coefficient ratio (measured on SmolLM2: tests/test_unlearn_smollm2.py, README).
"""

from __future__ import annotations

import pytest
import torch

from unlearn_lens.unlearning import losses as L


def _grads(deviation: float):
    generator = torch.Generator().manual_seed(0)
    frozen = torch.randn(2, 5, 64, generator=generator, dtype=torch.float64) * 10
    direction = torch.randn(2, 5, 64, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 5)
    hidden = (frozen + deviation * direction).requires_grad_(True)
    _, forget, retain = L.rr_layer_mean_loss([hidden], [frozen], mask, [hidden], [frozen], mask, 1.0, 1.0)
    (g_forget,) = torch.autograd.grad(forget, hidden, retain_graph=True)
    (g_retain,) = torch.autograd.grad(retain, hidden) if deviation else (torch.zeros_like(hidden),)
    return float(g_forget.norm()), float(g_retain.norm())


def test_rr_rerouting_gradient_vanishes_at_the_start_and_grows_with_the_deviation():
    small, large = _grads(1e-3)[0], _grads(1e-2)[0]
    # cos(h, h) = 1 is the maximum: zero gradient up to float32 rounding (4e-10 here). Adam does not
    # normalise such a gradient into a step of about the learning rate: its step lr g / (|g| + eps) is
    # lr |g| / eps for |g| far below eps 1e-8 (SmolLM2's cb reference start: 1.3e-11 RMS per weight,
    # a first step of 0.0014 lr RMS; tests/data/unlearn_measurements/cb_first_adam_step.py)
    assert _grads(0.0)[0] < 1e-3 * large
    assert small > 0 and large / small == pytest.approx(10.0, rel=1e-2)  # linear in the deviation
    # a deviation of 1 on activations of norm ~80: the retain term's gradient is ~800x the rerouting one's
    forget, retain = _grads(1.0)
    assert retain > 500 * forget


def test_rr_retain_gradient_has_unit_norm_per_token_whatever_the_deviation():
    tokens = 2 * 5
    for deviation in (1e-6, 1e-3, 1.0):
        # mean over tokens of ||h - h0||: each token's gradient is a unit vector / tokens
        assert _grads(deviation)[1] == pytest.approx(tokens ** 0.5 / tokens, rel=1e-6)  # float32 losses
