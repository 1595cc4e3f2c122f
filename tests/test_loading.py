"""Loading from local directories, GGUF and the hub, and the errors users see."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from unlearn_lens.core.errors import UserError
from unlearn_lens.loading import load_model, resolve_source


def test_local_directory_roundtrip(tiny_model_dir, family):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.config.model_type == family
    assert tokenizer.pad_token is not None
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32


def test_sharded_checkpoint_loads_identically(tmp_path):
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("gpt_neox")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded, _ = load_model(str(tmp_path))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_dtype_flag(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="bfloat16", with_tokenizer=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtype="float8")


def test_source_resolution(tmp_path):
    assert resolve_source("EleutherAI/deep-ignorance-unfiltered").kind == "hub"
    with pytest.raises(UserError, match="no such model"):
        resolve_source(str(tmp_path / "missing" / "model"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=".gguf"):
        resolve_source(str(tmp_path / "weights.bin"))


def test_unreachable_hub_id_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load 'no-such-org/no-such-model@main' from the Hugging Face hub"):
        load_model("no-such-org/no-such-model", revision="main")


@pytest.mark.slow
def test_gguf_and_materialised_smollm2_agree(smollm2_gguf, smollm2_dir):
    gguf_model, tokenizer = load_model(str(smollm2_gguf))
    dir_model, dir_tokenizer = load_model(str(smollm2_dir))
    assert gguf_model.config.model_type == "llama" and gguf_model.config.num_hidden_layers == 30
    text = "The mitochondria is the powerhouse of the"
    ids = tokenizer(text, return_tensors="pt")
    assert dir_tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(gguf_model(**ids).logits, dir_model(**ids).logits)
        next_token = dir_model(**ids).logits[0, -1].argmax()
    assert dir_tokenizer.decode(next_token).strip() == "cell"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (("models", "info", "--model", "/nonexistent/model/dir"), "no such model file or directory"),
    (("models", "info", "--model", "no-such-org/no-such-model"), "could not load"),
])
def test_cli_bad_model_is_one_line_error(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_architecture(tmp_path):
    from transformers import AutoModelForCausalLM, Olmo2Config

    AutoModelForCausalLM.from_config(Olmo2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    result = _cli("models", "info", "--model", str(tmp_path))
    assert result.returncode == 2 and "--arch-spec" in result.stderr and "Traceback" not in result.stderr


def test_cli_models_info(tiny_model_dir, family):
    result = _cli("models", "info", "--model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    assert f'"family": "{family}"' in result.stdout
