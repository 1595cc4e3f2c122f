"""The torch-free lazy checkpoint reader: safetensors (F32/F16/BF16, sharded), tiny HF models, GGUF."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from analyses.weights.checkpoints import (
    bf16_bits_to_float32,
    gguf_to_hf_name,
    open_checkpoint,
    read_safetensors_header,
    unpermute_rows,
)
from unlearn_lens.core.errors import UserError

LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1, "tie_word_embeddings": False}


def _write_dir(path, tensors, config=LLAMA_CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _write_bf16_safetensors(file, tensors: dict[str, np.ndarray]) -> None:
    """Craft a BF16 safetensors file by hand: JSON header + raw top halves of float32 values."""
    header, blobs, offset = {}, [], 0
    for name, values in tensors.items():
        bits = (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
        blob = bits.tobytes()
        header[name] = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_f32_f16_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((6, 4)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((4, 4)).astype(np.float16),
        "model.embed_tokens.weight": rng.standard_normal((10, 4)).astype(np.float32),
        "lm_head.weight": rng.standard_normal((10, 4)).astype(np.float32),
    }
    ckpt = open_checkpoint(str(_write_dir(tmp_path / "m", tensors)))
    assert ckpt.family == "llama" and ckpt.config["hidden_size"] == 4
    assert ckpt.names() == sorted(tensors)
    for name, value in tensors.items():
        assert ckpt.shape(name) == value.shape
        np.testing.assert_array_equal(ckpt.read(name, dtype=None), value)
        assert ckpt.read(name).dtype == np.float32
    q = ckpt.read_matrix("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == np.float32 and q.flags.c_contiguous
    np.testing.assert_array_equal(q, tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float32))
    # untied: the unembedding is lm_head, not the input embedding
    np.testing.assert_array_equal(ckpt.unembedding(), tensors["lm_head.weight"])


def test_bf16_crafted_file(tmp_path):
    rng = np.random.default_rng(1)
    exact = bf16_bits_to_float32((rng.standard_normal((5, 4)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
    directory = tmp_path / "bf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    _write_bf16_safetensors(directory / "model.safetensors", {"model.layers.0.mlp.down_proj.weight": exact,
                                                               "model.norm.weight": exact[0]})
    header, start = read_safetensors_header(directory / "model.safetensors")
    assert header["model.norm.weight"]["dtype"] == "BF16" and start % 8 == 0
    ckpt = open_checkpoint(str(directory))
    assert ckpt.stored_dtype("model.layers.0.mlp.down_proj.weight") == "BF16"
    np.testing.assert_array_equal(ckpt.read("model.layers.0.mlp.down_proj.weight"), exact)
    np.testing.assert_array_equal(ckpt.read("model.norm.weight"), exact[0])


def test_bf16_matches_torch(tmp_path):
    """A BF16 file written by torch's safetensors decodes to torch's own float32 values."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    values = torch.randn(7, 3).to(torch.bfloat16)
    directory = tmp_path / "tb"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    save_torch({"model.layers.0.mlp.up_proj.weight": values}, str(directory / "model.safetensors"))
    got = open_checkpoint(str(directory)).read("model.layers.0.mlp.up_proj.weight")
    np.testing.assert_array_equal(got, values.float().numpy())


def test_sharded_index(tmp_path):
    rng = np.random.default_rng(2)
    a = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((3, 4)).astype(np.float32)}
    b = {"model.layers.1.mlp.up_proj.weight": rng.standard_normal((3, 4)).astype(np.float32),
         "model.embed_tokens.weight": rng.standard_normal((9, 4)).astype(np.float32)}
    directory = tmp_path / "sh"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "tie_word_embeddings": True}))
    save_file(a, str(directory / "model-00001-of-00002.safetensors"))
    save_file(b, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = open_checkpoint(str(directory))
    assert ckpt.names() == sorted({**a, **b})
    for name, value in {**a, **b}.items():
        np.testing.assert_array_equal(ckpt.read(name), value)
    np.testing.assert_array_equal(ckpt.unembedding(), b["model.embed_tokens.weight"])  # tied


def test_tiny_models_match_hf(tiny_model_dir, family):
    """Orientation (out, in) for every linear weight, and the unembedding, against the HF model."""
    import torch  # noqa: F401  (tests may use torch; analyses/ may not)
    from transformers import AutoModelForCausalLM

    from unlearn_lens.core.naming import is_linear_weight

    ckpt = open_checkpoint(str(tiny_model_dir))
    assert ckpt.family == family
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    params = dict(model.named_parameters())
    linear = [n for n in ckpt.names() if is_linear_weight(n, family, len(ckpt.shape(n)))]
    assert linear
    for name in linear:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        matrix = ckpt.read_matrix(name)
        if family == "gpt2":  # Conv1D: stored (in, out), forward is x @ W
            expected = module.weight.detach().numpy().T
            assert matrix.shape == (module.nf, module.weight.shape[0])
        else:
            expected = module.weight.detach().numpy()
            assert matrix.shape == (module.out_features, module.in_features)
        np.testing.assert_array_equal(matrix, expected)
        assert name in params or any(n.endswith(name.split(".", 1)[1]) for n in params)
    np.testing.assert_array_equal(ckpt.unembedding(), model.get_output_embeddings().weight.detach().numpy())


def test_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such model"):
        open_checkpoint(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        open_checkpoint(str(empty))
    (empty / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(UserError, match="no safetensors"):
        open_checkpoint(str(empty))
    weird = _write_dir(tmp_path / "weird", {"x.weight": np.zeros((2, 2), np.float32)}, {"model_type": "t5"})
    with pytest.raises(UserError, match="unsupported architecture"):
        open_checkpoint(str(weird))
    not_model = tmp_path / "x.txt"
    not_model.write_text("hi")
    with pytest.raises(UserError, match=".gguf"):
        open_checkpoint(str(not_model))
    ok = open_checkpoint(str(_write_dir(tmp_path / "ok", {"model.layers.0.mlp.up_proj.weight": np.zeros((2, 2), np.float32)})))
    with pytest.raises(UserError, match="no tensor named"):
        ok.read("nope")


def test_unreachable_hub_id_is_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        open_checkpoint("nobody-h2/definitely-not-a-model", revision="main")
    assert "\n" not in str(info.value) and "hub" in str(info.value)


def test_gguf_name_map_and_unpermute():
    assert gguf_to_hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None
    # llama.cpp's permute (convert_hf_to_gguf.py), then ours must undo it
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2 * 8, 5))
    n_head = 2
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)


def test_no_torch_imported():
    code = ("import sys, analyses.weights.checkpoints, analyses.io; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers','nnsight')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@pytest.mark.smollm2
def test_gguf_matches_transformers(smollm2_gguf):
    """Every tensor of the SmolLM2 Q4_1 GGUF equals transformers' own GGUF dequantization."""
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(str(smollm2_gguf))
    assert ckpt.family == "llama" and ckpt.config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    state = model.state_dict()
    assert set(ckpt.names()) == set(state) - {"lm_head.weight"}  # tied: no output tensor
    for name in ckpt.names():
        if ".layers." in name and not any(f".layers.{i}." in name for i in (0, 1, 29)):
            continue  # a few layers suffice; every role is covered
        np.testing.assert_array_equal(ckpt.read(name), state[name].float().numpy(), err_msg=name)
    np.testing.assert_array_equal(ckpt.unembedding(), state["lm_head.weight"].float().numpy())
