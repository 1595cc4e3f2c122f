"""cb / cb_lat reference presets train the adapters with LoRA dropout on, as GraySwan and deep
ignorance do (their adapted passes run after ``model.train()``), while the frozen passes and
cb_lat's attack run in eval mode (their ``disable_adapter`` + ``model.eval()``)."""

from __future__ import annotations

import pytest
import torch

from unlearn_lens.testing import make_tiny_model
from unlearn_lens.unlearning.config import UnlearnConfig


@pytest.mark.parametrize("method", ["cb", "cb_lat"])
def test_reference_presets_turn_lora_dropout_on(method):
    cfg = UnlearnConfig(model="m", data="d", outdir="o", method=method, preset="reference")
    cfg.apply_preset(set())
    assert cfg.lora and cfg.lora_dropout == 0.05 and cfg.train_dropout


def test_frozen_pass_is_dropout_free_while_the_adapted_pass_drops():
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.unlearning.lora import wrap_lora
    from unlearn_lens.unlearning.methods import Reference, forward

    base, tokenizer = make_tiny_model("llama", seed=2)
    for block in base.model.layers:  # the base model drops too (in train mode)
        block.self_attn.attention_dropout = 0.5
    ids = tokenizer(["the cell membrane controls what enters"], return_tensors="pt")
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    with torch.no_grad():
        clean = base(**batch).logits
    model = wrap_lora(base, "llama", r=4, alpha=4.0, dropout=0.5)
    with torch.no_grad():  # adapters away from zero, so their dropout shows in the output
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    adapter = ArchitectureAdapter(model.get_base_model())
    reference = Reference(model, adapter, disable=model.disable_adapter)
    model.train(True)
    torch.manual_seed(0)
    first, _ = reference(batch)
    second, _ = reference(batch)
    assert model.training  # the trained passes' mode is restored
    torch.testing.assert_close(first, clean)  # adapters off, no dropout: the base model exactly
    torch.testing.assert_close(second, clean)
    with torch.no_grad():
        a, _ = forward(model, adapter, batch)
        b, _ = forward(model, adapter, batch)
    assert not torch.allclose(a, b)  # LoRA dropout acts on the adapted passes
    model.eval()
    with torch.no_grad():
        c, _ = forward(model, adapter, batch)
        d, _ = forward(model, adapter, batch)
    torch.testing.assert_close(c, d)
