"""Known answers for the unlearning loss functions, the adversary and config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unlearn_lens.core.errors import UserError
from unlearn_lens.unlearning import losses as L
from unlearn_lens.unlearning.adversary import pgd_perturbation, project
from unlearn_lens.unlearning.config import UnlearnConfig


def test_mean_token_nll_matches_cross_entropy_with_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = ids.clone()
    labels[mask == 0] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(L.mean_token_nll(logits, ids, mask)) == pytest.approx(float(expected), rel=1e-6)


def test_sequence_logprob_sum_and_normalised():
    logits = torch.zeros(1, 4, 5)  # uniform: every token has log-prob -log 5
    ids = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(L.sequence_logprob(logits, ids, mask)) == pytest.approx(-2 * math.log(5))
    assert float(L.sequence_logprob(logits, ids, mask, normalise=True)) == pytest.approx(-math.log(5))


def test_npo_simnpo_dpo_known_values():
    beta = 0.5
    lp, ref = torch.tensor([-3.0]), torch.tensor([-1.0])
    assert float(L.npo_loss(lp, ref, beta)) == pytest.approx(-(2 / beta) * math.log(1 / (1 + math.exp(-1.0))))
    assert float(L.npo_loss(ref, ref, beta)) == pytest.approx((2 / beta) * math.log(2))  # equals ref: 2/b log 2
    assert float(L.simnpo_loss(torch.tensor([-2.0]), beta)) == pytest.approx(
        -(2 / beta) * math.log(1 / (1 + math.exp(-1.0))))
    zero = torch.zeros(3)
    assert float(L.dpo_loss(zero, zero, zero, zero, beta)) == pytest.approx((2 / beta) * math.log(2))
    chosen = torch.tensor([1.0, 1.0])  # open-unlearning's -(2/beta) log sigmoid(beta * margin)
    assert float(L.dpo_loss(chosen, zero[:2], -chosen, zero[:2], 1.0)) == pytest.approx(
        -2 * math.log(1 / (1 + math.exp(-2))))


def test_labelled_logprob_sums_only_the_labelled_tokens():
    logits = torch.zeros(1, 4, 5)  # uniform: every token has log-prob -log 5
    ids = torch.tensor([[0, 1, 2, 3]])
    assert float(L.labelled_logprob(logits, ids, torch.tensor([[0, 0, 1, 1]]))) == pytest.approx(-2 * math.log(5))
    assert float(L.labelled_logprob(logits, ids, torch.tensor([[1, 0, 0, 1]]))) == pytest.approx(-math.log(5))


def test_rms_distance_is_size_independent():
    small = [torch.zeros(10)]
    large = [torch.zeros(1000), torch.zeros(10, 10)]
    assert float(L.rms_distance([p + 0.1 for p in small], small)) == pytest.approx(0.1, rel=1e-4)
    assert float(L.rms_distance([p + 0.1 for p in large], large)) == pytest.approx(0.1, rel=1e-4)
    p = torch.zeros(4, requires_grad=True)
    L.rms_distance([p], [torch.zeros(4)]).backward()
    assert torch.isfinite(p.grad).all()  # finite (zero) gradient at the start


def test_uniform_targets_are_scaled_unit_vectors_per_layer():
    targets = L.uniform_unit_targets([3, 5], 16, 6.5, seed=1)
    assert set(targets) == {3, 5}
    for t in targets.values():
        assert t.shape == (1, 1, 16) and float(t.norm()) == pytest.approx(6.5) and (t >= 0).all()
    assert not torch.equal(targets[3], targets[5])
    assert torch.equal(L.uniform_unit_targets([3], 16, 6.5, seed=1)[3], targets[3])


def test_rr_schedule_and_loss():
    assert L.rr_coefficients(0, 100, 10.0) == (10.0, 0.0)
    assert L.rr_coefficients(100, 100, 10.0) == pytest.approx((5.0, 5.0))
    h = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3)
    loss, forget, retain = L.rr_loss(h, h, mask, h, h, mask, 1.0, 1.0)
    assert float(forget) == pytest.approx(1.0) and float(retain) == pytest.approx(0.0, abs=1e-6)
    _, forget, _ = L.rr_loss(h, -h, mask, h, h, mask, 1.0, 1.0)
    assert float(forget) == 0.0  # ReLU of a negative cosine


def test_rmu_and_cb_losses_mask_padding():
    hidden = torch.ones(1, 3, 4)
    hidden[0, 2] = 100.0  # a padded position that must not count
    mask = torch.tensor([[1, 1, 0]])
    target = torch.ones(1, 1, 4)
    loss, forget, retain = L.rmu_loss(hidden, mask, target, hidden, hidden, mask, alpha=2.0)
    assert float(forget) == 0.0 and float(loss) == 0.0
    loss, forget, retain = L.cb_loss(hidden, mask, target * 7, hidden, hidden, mask, alpha=2.0)
    assert float(forget) == pytest.approx(-1.0) and float(retain) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_lowers_objective_within_budget(norm):
    goal = torch.full((1, 3, 4), 2.0)
    mask = torch.tensor([[1, 1, 0]])
    delta, losses = pgd_perturbation(lambda d: (d - goal).pow(2).sum(), (1, 3, 4), mask, eps=0.5, steps=10,
                                     norm=norm)
    assert losses[-1] < losses[0]
    assert torch.equal(delta[0, 2], torch.zeros(4))  # padding stays unperturbed
    if norm == "linf":
        assert float(delta.abs().max()) <= 0.5 + 1e-6
    else:
        assert float(delta.norm(dim=-1).max()) <= 0.5 + 1e-6
    assert torch.equal(project(torch.full((1, 1, 4), 3.0), 1.0, "linf"), torch.ones(1, 1, 4))


def test_cosine_schedule():
    assert L.cosine_schedule(0, 10) == 1.0
    assert L.cosine_schedule(5, 10) == pytest.approx(0.5)
    assert L.cosine_schedule(0, 10, warmup=2) == 0.5
    assert L.cosine_schedule(3, 10, kind="constant") == 1.0


def test_config_validation_and_layer_resolution():
    with pytest.raises(UserError, match="unknown method"):
        UnlearnConfig("m", "d", "o", "nope").validate()
    with pytest.raises(UserError, match="--lora cannot be used with wt_dist"):
        UnlearnConfig("m", "d", "o", "wt_dist", lora=True).validate()
    with pytest.raises(UserError, match="not both"):
        UnlearnConfig("m", "d", "o", "ga", steps=3, epochs=1).validate()
    cfg = UnlearnConfig("m", "d", "o", "rmu")
    cfg.resolve_layers(32)
    assert cfg.layer_id == 7 and cfg.update_layers == [5, 6, 7] and cfg.update_roles == ["down"]
    shallow = UnlearnConfig("m", "d", "o", "lat", target_layers=[0, 1, 2])
    shallow.resolve_layers(3)
    assert shallow.layer_id == 2 and shallow.adversary_layer == 1
    with pytest.raises(UserError, match="out of range"):
        UnlearnConfig("m", "d", "o", "cb", layer_id=3).resolve_layers(3)
