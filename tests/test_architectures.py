"""Architecture adapter and parameter naming on tiny models of every supported family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unlearn_lens.architectures import ArchitectureAdapter, load_arch_spec
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.naming import LINEAR_ROLES, classify, is_linear_weight, orient
from unlearn_lens.testing import make_tiny_model

EXPECTED_ROLES = {
    "gpt_neox": {"attn": {"qkv", "out", "norm"}, "mlp": {"up", "down", "norm"}},
    "llama": {"attn": {"q", "k", "v", "out", "norm"}, "mlp": {"gate", "up", "down", "norm"}},
    "gpt2": {"attn": {"qkv", "out", "norm"}, "mlp": {"up", "down", "norm"}},
}


def test_every_parameter_is_classified(family):
    model, _ = make_tiny_model(family)
    adapter = ArchitectureAdapter(model)
    roles: dict[str, set[str]] = {"attn": set(), "mlp": set()}
    for name, param in model.named_parameters():
        info = adapter.classify(name)
        assert info.role != "other", name
        if info.layer >= 0:
            assert 0 <= info.layer < adapter.num_layers
            assert info.group in ("attn", "mlp"), name
            roles[info.group].add(info.role)
        else:
            assert info.role in {"embed", "pos_embed", "unembed", "final_norm"}, name
    assert roles == EXPECTED_ROLES[family]


def test_linear_weights_oriented_out_in(family):
    """Every linear weight, normalised, maps the block's input width to its output width."""
    model, _ = make_tiny_model(family)
    adapter = ArchitectureAdapter(model)
    modules = dict(model.named_modules())
    checked = 0
    for name, param in model.named_parameters():
        if not is_linear_weight(name, family, param.ndim):
            continue
        module = modules[name.rsplit(".", 1)[0]]
        weight = orient(name, param.detach().numpy(), family)
        x = torch.randn(3, weight.shape[1])
        expected = module(x).detach().numpy() - (module.bias.detach().numpy() if module.bias is not None else 0)
        # tolerance: F32-ORDER (numpy's matmul vs torch's linear)
        np.testing.assert_allclose(x.numpy() @ weight.T, expected, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == adapter.num_layers * (4 if family != "llama" else 7)


def test_block_outputs_match_output_hidden_states(family):
    model, tokenizer = make_tiny_model(family)
    adapter = ArchitectureAdapter(model)
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def save(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return save

    handles = [adapter.block(i).register_forward_hook(hook(i)) for i in range(adapter.num_layers)]
    batch = tokenizer(["The cell membrane controls transport."], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    hidden = out.hidden_states
    assert len(hidden) == adapter.num_layers + 1
    embedded = adapter.embed()(batch["input_ids"])
    if family == "gpt2":  # learned absolute positions are added to the token embedding
        embedded = embedded + model.transformer.wpe(torch.arange(batch["input_ids"].shape[1]))
    torch.testing.assert_close(embedded, hidden[0])
    for i in range(adapter.num_layers - 1):
        torch.testing.assert_close(captured[i], hidden[i + 1])
    # HF's last entry is after the final norm; the block output is before it.
    torch.testing.assert_close(adapter.final_norm()(captured[adapter.num_layers - 1]), hidden[-1])
    logits = adapter.unembed()(hidden[-1])
    torch.testing.assert_close(logits, out.logits)


def test_final_norm_description_reproduces_the_norm(family):
    model, _ = make_tiny_model(family)
    adapter = ArchitectureAdapter(model)
    desc = adapter.final_norm_description()
    x = torch.randn(5, model.config.hidden_size)
    expected = adapter.final_norm()(x).detach().numpy()
    xn = x.numpy().astype(np.float64)
    if desc["kind"] == "layernorm":
        normed = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + desc["eps"])
        manual = normed * desc["weight"] + desc["bias"]
    else:
        manual = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + desc["eps"]) * desc["weight"]
    # tolerance: F32-ORDER (numpy norm formula vs the torch module)
    np.testing.assert_allclose(manual, expected, rtol=1e-4, atol=1e-5)
    assert desc["kind"] == ("rmsnorm" if family == "llama" else "layernorm")


def test_parameter_selection_by_name_not_index():
    model, _ = make_tiny_model("gpt_neox")
    adapter = ArchitectureAdapter(model)
    names = adapter.parameter_names(roles={"down"}, layers={0, 1})
    assert names == [f"gpt_neox.layers.{i}.mlp.dense_4h_to_h.{k}" for i in (0, 1) for k in ("weight", "bias")]


def test_checkpoint_names_without_prefix_and_old_neox_unembedding():
    assert classify("h.3.mlp.c_fc.weight", "gpt2").layer == 3
    assert classify("h.3.mlp.c_fc.weight", "gpt2").role == "up"
    assert classify("embed_out.weight", "gpt_neox").role == "unembed"
    assert classify("gpt_neox.layers.12.attention.dense.weight", "gpt_neox") .group == "attn"
    assert classify("model.layers.5.mlp.down_proj.weight", "llama").role == "down"
    assert {"qkv", "up", "down"} <= LINEAR_ROLES


def _olmo2_model():
    from transformers import AutoModelForCausalLM, Olmo2Config

    config = Olmo2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config)


def test_unknown_architecture_names_the_fix():
    with pytest.raises(UserError, match=r"olmo2.*--arch-spec.*blocks"):
        ArchitectureAdapter(_olmo2_model())


def test_arch_spec_file_supports_an_unknown_family(tmp_path):
    spec = {"family": "llama", "blocks": "model.layers", "mlp": "mlp", "attn": "self_attn",
            "final_norm": "model.norm", "unembed": "lm_head", "embed": "model.embed_tokens"}
    path = tmp_path / "olmo2.json"
    path.write_text(json.dumps(spec))
    adapter = ArchitectureAdapter(_olmo2_model(), str(path))
    assert adapter.num_layers == 2
    bad = dict(spec, blocks="model.decoder.layers")
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="model.decoder.layers"):
        ArchitectureAdapter(_olmo2_model(), str(path))
    path.write_text("{not json")
    with pytest.raises(UserError, match="invalid architecture spec"):
        load_arch_spec(path)
