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
