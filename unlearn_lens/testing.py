"""Tiny random-init models and a locally built tokenizer, for tests and offline examples.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on a fixed corpus,
and the models are built from configs (GPT-NeoX, Llama, GPT-2) and saved as ordinary HF
directories, so tests exercise the same loading path as real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "The cell membrane controls what enters and leaves the cell.",
    "Viruses replicate inside host cells using the host's machinery.",
    "Bacteria divide by binary fission and can exchange plasmids.",
    "Proteins fold into shapes that determine their function in the body.",
    "The river flows through the valley toward the distant sea.",
    "Paris is the capital of France and a centre of art and science.",
    "The orchestra played a symphony by Beethoven to a full hall.",
    "Question: Which organelle produces most of the cell's energy?",
    "A. Nucleus\nB. Mitochondrion\nC. Ribosome\nD. Golgi apparatus\nAnswer: B",
    "Answer: A Answer: B Answer: C Answer: D",
    " A B C D A B C D",
    "The following are multiple choice questions (with answers) about biology.",
    "In 1905 Einstein published papers on relativity and the photoelectric effect.",
    "Mountains form where tectonic plates collide over millions of years.",
] * 4


def build_tokenizer(vocab_size: int = 400):
    """A small byte-level BPE tokenizer (PreTrainedTokenizerFast) with EOS/BOS/PAD tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )


def tiny_config(family: str, tokenizer, *, hidden: int = 32, layers: int = 3, heads: int = 4):
    """Config of a tiny model of the given family (random init is done by the model class)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    special = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=4 * hidden,
                             max_position_embeddings=256, rotary_pct=0.25,
                             tie_word_embeddings=False, **special)
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads // 2,
                           intermediate_size=3 * hidden, max_position_embeddings=256,
                           tie_word_embeddings=True, **special)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                          tie_word_embeddings=True, **special)
    raise ValueError(f"unknown family {family!r}")


def make_tiny_model(family: str, seed: int = 0, **config_kwargs):
    """``(model, tokenizer)``: a random-init tiny causal LM in float32 eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(family, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def save_tiny_model(family: str, path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny model as an HF directory (config, safetensors, tokenizer) and return its path."""
    model, tokenizer = make_tiny_model(family, seed=seed, **config_kwargs)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_study(root: str | Path) -> dict[str, Path]:
    """A tiny GPT-NeoX base, a copy with a planted rank-one MLP edit (block 1's up projection) and
    the demo data under ``root``: the study the pipeline tests run end to end."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from unlearn_lens.data import create_datasets

    root = Path(root)
    base = save_tiny_model("gpt_neox", root / "base")
    edited = save_tiny_model("gpt_neox", root / "edited")
    weights = load_file(str(edited / "model.safetensors"))
    rng = np.random.default_rng(0)
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    weights[name] = weights[name] + 0.05 * np.outer(rng.normal(size=weights[name].shape[0]),
                                                    rng.normal(size=weights[name].shape[1])).astype(np.float32)
    save_file(weights, str(edited / "model.safetensors"), metadata={"format": "pt"})
    create_datasets(root / "data", source="demo")
    return {"root": root, "base": base, "edited": edited, "data": root / "data"}


def save_tiny_trained_model(path: str | Path, data: str | Path, steps: int = 60, lr: float = 3e-3) -> Path:
    """A tiny GPT-NeoX trained for ``steps`` steps on the forget and retain texts of ``data``: a base whose
    forget-text NLL is well below a random model's, so unlearning has something to undo (the tiny study)."""
    from unlearn_lens.relearn import relearn_condition

    model, tokenizer = make_tiny_model("gpt_neox")
    texts = [line for name in ("forget.txt", "retain.txt")
             for line in (Path(data) / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    relearn_condition(model, tokenizer, texts, steps=steps, lr=lr, batch_size=8, max_length=32, seed=0,
                      eval_every=steps + 1, evaluate_fn=lambda m: {}, start_eval={})
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
