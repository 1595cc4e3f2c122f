"""Each unlearning method on tiny models: the objective moves as intended, invariants hold.

Runs go through ``trainer.train`` (the same path as the CLI) for a few steps on a tiny
GPT-NeoX / Llama / GPT-2 model; the checks compare the trained model with the base model.
"""

from __future__ import annotations

import pytest
import torch

from unlearn_lens.architectures import ArchitectureAdapter
from unlearn_lens.evaluation import mean_token_nll
from unlearn_lens.loading import load_model
from unlearn_lens.unlearning.config import UnlearnConfig
from unlearn_lens.unlearning.hooks import tap_blocks
from unlearn_lens.unlearning.losses import masked_cosine, masked_mse, uniform_unit_targets
from unlearn_lens.unlearning.trainer import load_run_data, train
from unlearn_lens.testing import save_tiny_model

from conftest import UNLEARN_FORGET, UNLEARN_RETAIN


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn-models")
    return {family: str(save_tiny_model(family, root / family)) for family in ("gpt_neox", "llama", "gpt2")}


def run(models, data_dir, method, family="gpt_neox", **overrides):
    options = dict(steps=6, batch_size=4, max_length=24, lr=1e-2, device="cpu", eval_split=0.0, alpha=1.0,
                   steering_coeff=5.0, lat_steps=3, lat_eps=1.0, eval_every=100)
    options.update(overrides)
    cfg = UnlearnConfig(model=models[family], data=str(data_dir), outdir="/nonexistent", method=method, **options)
    return train(cfg, progress=False)


def base(models, family="gpt_neox"):
    return load_model(models[family], device="cpu")


def nll(model, tokenizer, texts):
    return mean_token_nll(model, tokenizer, texts, max_length=24, batch_size=8)


def hidden(model, tokenizer, texts, layer):
    adapter = ArchitectureAdapter(model.get_base_model() if hasattr(model, "get_base_model") else model)
    batch = tokenizer(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad(), tap_blocks(adapter, [layer]) as captured:
        model(**batch)
    return captured[layer], batch["attention_mask"]


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- logit losses -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ga_simple", "ga", "grad_diff", "npo", "simnpo"])
def test_forget_nll_rises_more_than_retain(models, unlearn_data_dir, method):
    model0, tokenizer = base(models)
    result = run(models, unlearn_data_dir, method)
    forget_rise = nll(result.model, tokenizer, UNLEARN_FORGET) - nll(model0, tokenizer, UNLEARN_FORGET)
    retain_rise = nll(result.model, tokenizer, UNLEARN_RETAIN) - nll(model0, tokenizer, UNLEARN_RETAIN)
    assert forget_rise > 0.05
    if method != "ga_simple":  # the retain term holds retain NLL back
        assert forget_rise > retain_rise + 0.05


def test_dpo_margin_grows_and_reference_is_frozen(models, unlearn_data_dir):
    model0, tokenizer = base(models)
    result = run(models, unlearn_data_dir, "dpo", lr=3e-3)
    losses = [row["preference_loss"] for row in result.log]
    # F32: -(2/beta) log sigmoid(0) = 20 * 0.693147..., to the 4 digits written
    assert losses[0] == pytest.approx(20 * 0.693147, abs=1e-3)  # policy == reference at step 0
    assert losses[-1] < losses[0] - 0.5
    for name, param in result.reference.model.named_parameters():  # the frozen copy never moved
        assert not param.requires_grad
        torch.testing.assert_close(param, dict(model0.named_parameters())[name], atol=0, rtol=0)
    # the forget continuations become less likely relative to retain
    delta_forget = nll(result.model, tokenizer, UNLEARN_FORGET) - nll(model0, tokenizer, UNLEARN_FORGET)
    delta_retain = nll(result.model, tokenizer, UNLEARN_RETAIN) - nll(model0, tokenizer, UNLEARN_RETAIN)
    assert delta_forget > delta_retain


def test_npo_reference_unchanged(models, unlearn_data_dir):
    model0, _ = base(models)
    result = run(models, unlearn_data_dir, "npo", steps=2)
    reference = dict(result.reference.model.named_parameters())
    for name, param in model0.named_parameters():
        torch.testing.assert_close(reference[name], param, atol=0, rtol=0)


# --- representation methods ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_rmu_moves_forget_to_target_and_updates_only_named_params(models, unlearn_data_dir, family):
    model0, tokenizer = base(models, family)
    before = params(model0)
    result = run(models, unlearn_data_dir, "rmu", family=family, layer_id=2, steps=8, lr=3e-2, alpha=10.0)
    cfg = result.config
    assert cfg.update_layers == [0, 1, 2] and cfg.update_roles == ["down"]
    adapter = ArchitectureAdapter(result.model)
    named = set(adapter.parameter_names(roles={"down"}, layers={0, 1, 2}))
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= named  # only the MLP down-projections of layers 0..2
    assert all(adapter.classify(n).role == "down" for n in changed)
    target = uniform_unit_targets([2], model0.config.hidden_size, cfg.steering_coeff, cfg.seed)[2]
    f0, fmask = hidden(model0, tokenizer, UNLEARN_FORGET, 2)
    f1, _ = hidden(result.model, tokenizer, UNLEARN_FORGET, 2)
    mse_before, mse_after = float(masked_mse(f0, target, fmask)), float(masked_mse(f1, target, fmask))
    assert mse_after < 0.9 * mse_before
    r0, rmask = hidden(model0, tokenizer, UNLEARN_RETAIN, 2)
    r1, _ = hidden(result.model, tokenizer, UNLEARN_RETAIN, 2)
    forget_shift = float(masked_mse(f1, f0, fmask))
    assert float(masked_mse(r1, r0, rmask)) < forget_shift  # retain activations stay closer


@pytest.mark.parametrize("variant", ["original", "rr"])
def test_cb_reroutes_forget_activations(models, unlearn_data_dir, variant):
    model0, tokenizer = base(models)
    result = run(models, unlearn_data_dir, "cb", layer_id=1, cb_variant=variant, steps=8, lr=3e-3, alpha=2.0)
    f0, fmask = hidden(model0, tokenizer, UNLEARN_FORGET, 1)
    f1, _ = hidden(result.model, tokenizer, UNLEARN_FORGET, 1)
    if variant == "original":
        target = uniform_unit_targets([1], model0.config.hidden_size, 5.0, 0)[1]
        assert float(masked_cosine(f1, target, fmask)) > float(masked_cosine(f0, target, fmask)) + 0.05
    else:  # RR: forget representations turn away from the frozen ones
        assert float(masked_cosine(f1, f0, fmask)) < 0.9
    r0, rmask = hidden(model0, tokenizer, UNLEARN_RETAIN, 1)
    r1, _ = hidden(result.model, tokenizer, UNLEARN_RETAIN, 1)
    assert float(masked_cosine(r1, r0, rmask)) > float(masked_cosine(f1, f0, fmask))


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 0.5)])
def test_lat_adversary_helps_and_defender_unlearns(models, unlearn_data_dir, norm, eps):
    model0, tokenizer = base(models)
    result = run(models, unlearn_data_dir, "lat", layer_id=1, lat_norm=norm, lat_eps=eps)
    # the adversary lowers the forget NLL it starts from (the clean one) at every step
    assert all(row["adversary_nll"] < row["adversary_start_nll"] for row in result.log)
    forget_rise = nll(result.model, tokenizer, UNLEARN_FORGET) - nll(model0, tokenizer, UNLEARN_FORGET)
    retain_rise = nll(result.model, tokenizer, UNLEARN_RETAIN) - nll(model0, tokenizer, UNLEARN_RETAIN)
    assert forget_rise > retain_rise + 0.1


def test_cb_lat_runs_with_adversary_and_reroutes(models, unlearn_data_dir):
    model0, tokenizer = base(models)
    result = run(models, unlearn_data_dir, "cb_lat", layer_id=1, steps=8, lr=3e-3, alpha=2.0, lat_eps=0.2)
    assert all(row["adversary_nll"] < row["adversary_start_nll"] for row in result.log)
    target = uniform_unit_targets([1], model0.config.hidden_size, 5.0, 0)[1]
    f0, fmask = hidden(model0, tokenizer, UNLEARN_FORGET, 1)
    f1, _ = hidden(result.model, tokenizer, UNLEARN_FORGET, 1)  # clean forget activations moved too
    assert float(masked_cosine(f1, target, fmask)) > float(masked_cosine(f0, target, fmask)) + 0.05


# --- weight-space methods ------------------------------------------------------------------

def test_wt_dist_noise_has_requested_std(models, unlearn_data_dir):
    model0, tokenizer = base(models)
    result = run(models, unlearn_data_dir, "wt_dist", steps=1, lr=1e-12, optimizer="sgd", wt_noise_std=0.05)
    # STAT: the std of the noise on every parameter of the tiny model (~5e4 Gaussian draws: relative
    # standard error 1/sqrt(2n) ~ 0.3 %) is within 2 % of 0.05
    assert result.resolved["weight_noise_std"] == pytest.approx(0.05, rel=0.02)
    before = params(model0)
    diffs = torch.cat([(p.detach() - before[n]).flatten() for n, p in result.model.named_parameters()])
    assert float(diffs.std()) == pytest.approx(0.05, rel=0.02)
    assert abs(float(diffs.mean())) < 0.005


def test_wt_dist_then_retain_nll_falls(models, unlearn_data_dir):
    result = run(models, unlearn_data_dir, "wt_dist", steps=8, lr=3e-3, wt_noise_std=0.05)
    retain = [row["retain_loss"] for row in result.log]
    assert retain[-1] < retain[0]


def test_wt_dist_reg_moves_away_from_pretrained(models, unlearn_data_dir):
    result = run(models, unlearn_data_dir, "wt_dist_reg", steps=6, lr=1e-2, wt_reg_lambda=10.0)
    distance = [row["weight_rms_distance"] for row in result.log]
    assert distance[0] < 1e-5 and distance[-1] > distance[1] > 0


# --- LoRA, reproducibility, data ------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_lora_base_untouched_and_merge_changes_only_targets(models, unlearn_data_dir, family):
    from unlearn_lens.unlearning.lora import LORA_TARGETS, merge

    model0, _ = base(models, family)
    before = params(model0)
    result = run(models, unlearn_data_dir, "ga", family=family, lora=True, lora_r=4, steps=3)
    peft_model = result.model
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(param, before[plain], atol=0, rtol=0)
    merged = merge(peft_model)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, before[n])}
    module_of = {n: n.rsplit(".", 2)[-2] for n in before}
    assert changed and all(module_of[n] in LORA_TARGETS[family] for n in changed)
    assert {module_of[n] for n in changed} == set(LORA_TARGETS[family])  # every linear, not just QKV


def test_lora_explicit_targets(models, unlearn_data_dir):
    from unlearn_lens.unlearning.lora import merge

    model0, _ = base(models, "llama")
    before = params(model0)
    result = run(models, unlearn_data_dir, "npo", family="llama", lora=True, lora_r=4, steps=3,
                 lora_targets=["q_proj", "down_proj"])
    merged = merge(result.model)
    changed = {n.rsplit(".", 2)[-2] for n, p in merged.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"q_proj", "down_proj"}


@pytest.mark.parametrize("method", ["lat", "wt_dist", "cb"])
def test_same_seed_same_weights(models, unlearn_data_dir, method):
    first = params(run(models, unlearn_data_dir, method, layer_id=1, steps=3).model)
    second = params(run(models, unlearn_data_dir, method, layer_id=1, steps=3).model)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_eval_split_is_held_out_and_seeded(unlearn_data_dir):
    cfg = UnlearnConfig(model="x", data=str(unlearn_data_dir), outdir="y", method="ga", eval_split=0.25)
    data = load_run_data(cfg)
    assert len(data.forget_eval) == 4 and len(data.forget_train) == 12
    assert data.data_hash == "test-data-hash"
    again = load_run_data(cfg)
    assert again.forget_eval == data.forget_eval and again.retain_eval == data.retain_eval


def test_lora_reference_is_the_base_model(models, unlearn_data_dir):
    """Under --lora the frozen reference is the same model with adapters off: base logits exactly."""
    model0, tokenizer = base(models, "llama")
    result = run(models, unlearn_data_dir, "npo", family="llama", lora=True, lora_r=4, steps=2)
    batch = tokenizer(UNLEARN_FORGET[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model0(**batch).logits
        trained = result.model(**batch).logits
    reference_logits, _ = result.reference(batch)
    # tolerance: F32-ORDER (the frozen reference model vs the same weights before training)
    torch.testing.assert_close(reference_logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained, expected, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop", "adafactor"])
def test_optimizers_train(models, unlearn_data_dir, optimizer):
    model0, tokenizer = base(models)
    result = run(models, unlearn_data_dir, "ga_simple", optimizer=optimizer, steps=3, lr=1e-2)
    assert nll(result.model, tokenizer, UNLEARN_FORGET) > nll(model0, tokenizer, UNLEARN_FORGET)


def test_grad_accumulation_equals_larger_batch(models, unlearn_data_dir):
    """2 micro-batches of 2 == one batch of 4 (texts longer than max_length: equal token counts)."""
    common = dict(optimizer="sgd", lr=0.05, steps=2, max_length=10, grad_clip=0.0)
    accumulated = params(run(models, unlearn_data_dir, "ga", batch_size=2, grad_accum_steps=2, **common).model)
    single = params(run(models, unlearn_data_dir, "ga", batch_size=4, **common).model)
    for name in single:
        # tolerance: OPTIMISER, SGD (linear in the gradient: two micro-batches vs one batch differ
        # only in summation order, lr 0.05 x 2 steps x float32 rounding)
        torch.testing.assert_close(accumulated[name], single[name], atol=1e-6, rtol=1e-5)


def test_stop_after_runs_the_first_steps_of_the_longer_run(models, unlearn_data_dir):
    """--stop-after 3 of --steps 6: the same first 3 log rows as the 6-step run (its cosine LR, its data
    order), and no more."""
    full = run(models, unlearn_data_dir, "cb_lat", steps=6, target_layers=[1, 2], cb_variant="rr", eval_every=1)
    cut = run(models, unlearn_data_dir, "cb_lat", steps=6, stop_after=3, target_layers=[1, 2], cb_variant="rr",
              eval_every=1)
    assert len(full.log) == 6 and len(cut.log) == 3 and cut.resolved["run_steps"] == 3
    assert cut.resolved["total_steps"] == 6
    for row_cut, row_full in zip(cut.log, full.log[:3]):  # tolerance: EXACT (the same computation)
        assert row_cut.keys() == row_full.keys()
        assert {k: v for k, v in row_cut.items() if v == v} == {k: v for k, v in row_full.items() if v == v}
    assert full.log[2]["lr"] > full.log[3]["lr"]  # the schedule is the 6-step run's


# --- which losses read --forget-weight ---------------------------------------------------------

@pytest.mark.parametrize("method,variant", [(m, "original") for m in
                                            ("ga_simple", "ga", "grad_diff", "dpo", "npo", "simnpo", "rmu", "cb",
                                             "lat", "cb_lat", "wt_dist", "wt_dist_reg")]
                         + [("cb", "rr"), ("cb_lat", "rr")])
def test_forget_weight_changes_training_exactly_where_the_cli_accepts_it(models, unlearn_data_dir, method, variant):
    """The CLI refuses --forget-weight where reads_forget_weight says the loss has no such weight:
    two seeded runs that differ only in it end in the same weights there, and differ elsewhere."""
    from unlearn_lens.unlearning.method_names import reads_forget_weight

    runs = [params(run(models, unlearn_data_dir, method, steps=2, cb_variant=variant, forget_weight=w).model)
            for w in (1.0, 3.0)]
    same = all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert same is not reads_forget_weight(method, variant)
