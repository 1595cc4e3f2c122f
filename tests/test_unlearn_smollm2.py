"""A short RMU run on the real SmolLM2-135M raises forget NLL more than retain NLL."""

from __future__ import annotations

import pytest

from conftest import UNLEARN_FORGET, UNLEARN_RETAIN, write_unlearn_data


@pytest.mark.slow
@pytest.mark.smollm2
def test_rmu_on_smollm2_forgets_more_than_it_retains(smollm2_dir, tmp_path):
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method="rmu",
                        steps=8, batch_size=4, max_length=32, lr=3e-3, steering_coeff=100.0, alpha=100.0,
                        eval_split=0.0, device="cpu", eval_every=1000)
    result = train(cfg, progress=False)
    assert cfg.layer_id == 7 and cfg.update_layers == [5, 6, 7]  # WMDP's defaults, resolved on 30 layers
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    assert forget_rise > 0.1
    assert forget_rise > 3 * retain_rise


@pytest.mark.slow
@pytest.mark.smollm2
def test_rmu_reference_preset_on_smollm2_forgets_more_than_it_retains(smollm2_dir, tmp_path):
    """WMDP's published hyper-parameters (steering 6.5, alpha 1200, lr 5e-5 constant, no clipping,
    layer 7 / down-projections of 5-7 of 32, scaled to SmolLM2's 30 layers), only shorter."""
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method="rmu",
                        preset="reference", steps=12, max_length=32, eval_split=0.0, device="cpu", eval_every=1000)
    cfg.apply_preset({"steps", "max_length", "eval_split", "device", "eval_every"})
    result = train(cfg, progress=False)
    assert (cfg.steering_coeff, cfg.alpha, cfg.lr, cfg.grad_clip, cfg.lr_scheduler) == (6.5, 1200.0, 5e-5, 0.0, "constant")
    assert cfg.layer_id == 7 and cfg.update_layers == [5, 6, 7] and cfg.update_roles == ["down"]
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    # 12 steps at WMDP's lr 5e-5 (it runs 150): on this machine forget +0.0127, retain -0.0003 nats
    assert forget_rise > 0.005
    assert forget_rise > retain_rise + 0.005


@pytest.mark.slow
@pytest.mark.smollm2
def test_cb_lat_reference_preset_on_smollm2_forgets_more_than_it_retains(smollm2_dir, tmp_path):
    """Deep ignorance's rr-lat as its run script rr-lat.sh calls it (retain_coef 5, remove_coef 300
    = alpha 5 x forget weight 60, lr 2e-3 linear, combined adversary at the embedding, adv_lr 2e-3
    x 4, LoRA r16 up to the last target, targets 5..30 of 32 scaled to SmolLM2's 30 layers), only
    shorter: 16 steps, and batch 4 without accumulation instead of 1 x 32 (32 adversary fits per
    step do not fit a CPU test). The adversary makes the forget activations differ from the frozen
    ones from the first step, so the rerouting term has a gradient at once (compare the cb test)."""
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    shortened = {"steps": 16, "batch_size": 4, "grad_accum_steps": 1, "max_length": 32, "eval_split": 0.0,
                 "device": "cpu", "eval_every": 1000}
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method="cb_lat",
                        preset="reference", **shortened)
    cfg.apply_preset(set(shortened))
    result = train(cfg, progress=False)
    assert (cfg.cb_variant, cfg.alpha, cfg.forget_weight, cfg.lr, cfg.adversary, cfg.lat_steps) == (
        "rr", 5.0, 60.0, 2e-3, "combined", 4)
    assert cfg.lora and cfg.adversary_layers == [-1] and cfg.target_layers == [4, 8, 13, 18, 22, 27]
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    # measured: forget +7.14, retain -0.005 nats (mean ReLU(cos) to the frozen activations 0.97 -> 0.75).
    # Before LoRA dropout was on (eval mode throughout): 16 steps +7.04 / +0.010, 12 steps +0.47 / -0.06,
    # 8 steps -0.28 / -0.09 (not yet taken hold); unlearning.py's default remove_coef 5 (= retain_coef),
    # all else equal: 16 steps -0.23 / +0.07, the cosine stays at the adversary's 0.97-0.99 (the retain
    # anchor dominates; see the README)
    assert forget_rise > 1.0
    assert forget_rise > retain_rise + 1.0


@pytest.mark.slow
@pytest.mark.smollm2
def test_cb_rr_reference_preset_on_smollm2_holds_retain_but_does_not_reroute(smollm2_dir, tmp_path):
    """Where issue #14's cb proof stands: GraySwan's settings (rr, alpha 10, targets 10, 20 of 32,
    LoRA r16 up to the last target, lr 1e-4 constant, batch 16) do NOT raise forget NLL on SmolLM2,
    so this test pins what they do instead, only shorter (8 of 150 steps).

    At the LoRA start (B = 0) the adapted and frozen activations are equal: the rerouting term
    ReLU(cos) is at its maximum, where its gradient vanishes (step-1 gradient norm ~2e-8), and it
    then grows only with the deviation, while the retain anchor's gradient has unit norm per token
    (tests/test_unlearn_rr_start.py). Adam turns the rounding-level first gradient into a step, so
    the start does not stay put, but from there the retain anchor pulls the adapter back and the
    forget cosine never leaves 1. Measured on this machine with the full reference run (150 steps,
    batch 16, 32 tokens; before LoRA dropout was on): 1 - cos < 1e-6 at every step, forget NLL
    -0.0000, retain -0.0004 nats.
    Neither more steps nor a seeded start (LoRA B ~ N(0, 0.01^2): 1 - cos ~ 1e-4, unchanged over 16
    steps), nor the reference's literal t/300 schedule at lr 1e-3, nor forget weight 30 at lr 1e-3
    moved it; with the retain anchor off (c_retain ~ 0) the rerouting escapes within 10 steps at lr
    1e-3 but wrecks retain too (forget +8.5, retain +5.8 nats in 12 steps), as does forget weight
    1e4 (+6.0 / +5.9). cb_lat differs: its adversary makes the forget activations differ from the
    frozen ones from the first step (see the test above). If a change makes cb reroute, replace this
    test with the forget-more-than-retain proof."""
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    shortened = {"steps": 8, "max_length": 32, "eval_split": 0.0, "device": "cpu", "eval_every": 1000}
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method="cb",
                        preset="reference", **shortened)
    cfg.apply_preset(set(shortened))
    result = train(cfg, progress=False)
    assert (cfg.cb_variant, cfg.alpha, cfg.lr, cfg.batch_size, cfg.lora) == ("rr", 10.0, 1e-4, 16, True)
    assert cfg.target_layers == [8, 18]
    assert result.log[0]["grad_norm"] < 1e-6  # the stationary start
    assert all(row["forget_loss"] > 1 - 1e-5 for row in result.log)  # mean ReLU(cos) stays at 1
    assert any(row["retain_loss"] > 0 for row in result.log[1:])  # the adapter did move
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    # measured (8 steps): step-1 gradient norm 1.8e-8, forget -0.0001, retain +0.0011 nats
    assert abs(forget_rise) < 0.01 and abs(retain_rise) < 0.01
