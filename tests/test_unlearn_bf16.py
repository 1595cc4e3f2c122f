"""16-bit training keeps float32 master weights: a small update that pure-bfloat16 rounding
loses survives, the forwards run under bfloat16 autocast, and the model is saved in bfloat16."""

from __future__ import annotations

import json

import torch

from unlearn_lens.testing import save_tiny_model
from unlearn_lens.unlearning.config import UnlearnConfig


def test_bf16_run_keeps_float32_master_weights_and_saves_bf16(unlearn_data_dir, tmp_path, monkeypatch):
    from safetensors import safe_open

    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.trainer import save_run, train

    model_dir = save_tiny_model("llama", tmp_path / "m")
    base, _ = load_model(str(model_dir), dtype="float32")
    name = "model.layers.0.mlp.down_proj.weight"
    before = dict(base.named_parameters())[name].detach().clone()

    cfg = UnlearnConfig(model=str(model_dir), data=str(unlearn_data_dir), outdir=str(tmp_path / "out"), method="ga",
                        dtype="bfloat16", device="cpu", optimizer="sgd", lr=2e-4, steps=1, batch_size=2,
                        max_length=12, eval_split=0.0, grad_clip=0.0, eval_every=100)
    seen = []

    def spy(module, inputs, output):
        seen.append(output.dtype)

    import unlearn_lens.unlearning.methods as M

    original_forward = M.forward

    def forward_with_spy(model, adapter, batch, *args, **kwargs):
        block = adapter.block(0)
        handle = block.mlp.down_proj.register_forward_hook(spy)
        try:
            return original_forward(model, adapter, batch, *args, **kwargs)
        finally:
            handle.remove()

    # a float32 run first in the same process (as unlearn-all or the test suite do): accelerate's
    # process-wide state must not pin its precision on the bfloat16 run that follows
    plain = train(UnlearnConfig(**{**cfg.to_dict(), "dtype": "float32"}), progress=False)
    assert plain.resolved["autocast"] == "no" and plain.resolved["saved_dtype"] == "float32"
    monkeypatch.setattr(M, "forward", forward_with_spy)
    result = train(cfg, progress=False)
    assert result.resolved["train_weights_dtype"] == "float32" and result.resolved["autocast"] == "bf16"
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # the forwards ran in bfloat16

    after = dict(result.model.named_parameters())[name].detach()
    assert after.dtype == torch.float32
    update = after - before
    big = before.abs() > 0.01  # weights whose bfloat16 spacing (>= 2**-14) dwarfs the update
    assert big.sum() > 100 and float(update.abs().max()) < 1e-3
    kept = (update[big] != 0).float().mean()
    assert kept > 0.9  # the master weights took the small update

    # the same update applied to bfloat16 weights (a pure-bf16 step) rounds away for most of them
    pure = before.to(torch.bfloat16) + update.to(torch.bfloat16)
    lost = (pure[big] == before.to(torch.bfloat16)[big]).float().mean()
    assert lost > 0.9

    out = save_run(result)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes == {torch.bfloat16}
    run = json.loads((out / "config.json").read_text())["resolved"]
    assert run["saved_dtype"] == "bfloat16"
