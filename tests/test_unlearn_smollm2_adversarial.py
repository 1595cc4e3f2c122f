"""Short cb rr and cb_lat runs with their reference presets on the real SmolLM2-135M raise forget
NLL more than retain NLL (the reference loss, schedule, layers and LoRA; few steps and texts)."""

from __future__ import annotations

import pytest

from conftest import UNLEARN_FORGET, UNLEARN_RETAIN, write_unlearn_data


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.parametrize("method", ["cb", "cb_lat"])
def test_reference_preset_on_smollm2_forgets_more_than_it_retains(smollm2_dir, tmp_path, method):
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.presets import PRESETS, scale_layers
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    n_layers = base.config.num_hidden_layers
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    values = {}
    for key, value in PRESETS[method]["reference"].values.items():
        if key.endswith("_at_32"):
            values[key[: -len("_at_32")]] = scale_layers(value, n_layers)
        else:
            values[key] = value
    # few short steps on two CPU cores: smaller batches, fewer steps and a larger LoRA learning rate
    values.update(steps=8, batch_size=4, grad_accum_steps=1, max_length=32, lr=2e-3)
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method=method,
                        eval_split=0.0, device="cpu", eval_every=1000, **values)
    result = train(cfg, progress=False)
    assert cfg.cb_variant == "rr" and cfg.lora
    if method == "cb_lat":
        assert cfg.adversary == "combined" and cfg.adversary_layers == [-1]
        assert all(row["adversary_nll"] < row["adversary_start_nll"] for row in result.log)
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    assert forget_rise > 0.1
    assert forget_rise > 3 * retain_rise
