"""Synthetic activation caches that follow ``cache_store/SCHEMA.md`` exactly (torch-free).

Used by the analysis tests and benchmarks to plant known structure (a separation direction, a
spectrum, a row-space alignment, a lens answer) in a lazy, dask-backed ``xr.Dataset`` chunked
along ``token`` and ``sample`` like a real cache, without running any model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np
import xarray as xr


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def make_cache(
    resid: np.ndarray,
    lengths: Sequence[int],
    *,
    split: str = "forget",
    mlp_in: np.ndarray | None = None,
    input_ids: np.ndarray | None = None,
    extra: Mapping[str, tuple[tuple[str, ...], np.ndarray]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    token_chunk: int = 16,
    sample_chunk: int = 4,
    dtype: Any = np.float32,
    seed: int = 0,
) -> xr.Dataset:
    """A cache Dataset from a residual stream ``resid`` (L+1, T, d) and per-sample ``lengths``.

    ``last`` is taken from ``resid`` at each sample's last token; ``mlp_in`` defaults to random
    states; ``input_ids`` to ids drawn from ``seed``. Arrays are dask-backed with several chunks.
    """
    resid = np.asarray(resid)
    lengths = np.asarray(lengths, dtype=np.int32)
    n_layers1, n_tokens, hidden = resid.shape
    if int(lengths.sum()) != n_tokens:
        raise ValueError("sum(lengths) must equal the token count of resid")
    offsets = _offsets(lengths)
    rng = np.random.default_rng(seed)
    if mlp_in is None:
        mlp_in = rng.normal(size=(n_layers1 - 1, n_tokens, hidden))
    if input_ids is None:
        input_ids = rng.integers(0, 50, size=n_tokens)
    last = resid[:, offsets + lengths - 1, :]
    token_sample = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    token_position = (np.arange(n_tokens) - offsets[token_sample]).astype(np.int32)

    def lazy(array: np.ndarray, dims: tuple[str, ...]) -> da.Array:
        chunks = tuple(token_chunk if d == "token" else sample_chunk if d == "sample" else -1 for d in dims)
        return da.from_array(np.ascontiguousarray(array), chunks=chunks)

    data_vars = {
        "resid": (("layer", "token", "hidden"), lazy(resid.astype(dtype), ("layer", "token", "hidden"))),
        "mlp_in": (("mlp_layer", "token", "hidden"),
                   lazy(np.asarray(mlp_in).astype(dtype), ("mlp_layer", "token", "hidden"))),
        "last": (("layer", "sample", "hidden"), lazy(last.astype(dtype), ("layer", "sample", "hidden"))),
        "input_ids": (("token",), lazy(np.asarray(input_ids, dtype=np.int32), ("token",))),
        "attention_mask": (("token",), lazy(np.ones(n_tokens, dtype=np.int8), ("token",))),
        "token_sample": (("token",), lazy(token_sample, ("token",))),
        "token_position": (("token",), lazy(token_position, ("token",))),
        "sample_offset": (("sample",), lazy(offsets, ("sample",))),
        "sample_length": (("sample",), lazy(lengths, ("sample",))),
    }
    for name, (dims, value) in (extra or {}).items():
        data_vars[name] = (dims, lazy(np.asarray(value), dims))
    base_attrs = {
        "split": split, "num_layers": n_layers1 - 1, "hidden_size": hidden, "family": "llama",
        "model": "synthetic", "model_path": "", "revision": None, "weights_fingerprint": "synthetic",
        "tokenizer_fingerprint": "synthetic", "data_manifest_hash": "synthetic", "max_length": 512,
        "dtype": np.dtype(dtype).name, "versions": {}, "final_norm_kind": "rmsnorm",
        "final_norm_eps": 1e-5, "complete": True,
    }
    base_attrs.update(attrs or {})
    coords = {"layer": np.arange(n_layers1), "mlp_layer": np.arange(n_layers1 - 1),
              "token": np.arange(n_tokens), "sample": np.arange(len(lengths))}
    if any("choice" in dims for dims, _ in (extra or {}).values()):
        coords["choice"] = np.arange(4)
    return xr.Dataset(data_vars, coords=coords, attrs=base_attrs)


def random_lengths(n_samples: int, rng: np.random.Generator, low: int = 3, high: int = 9) -> np.ndarray:
    """Sample lengths for a synthetic split."""
    return rng.integers(low, high, size=n_samples).astype(np.int32)


def final_norm(x: np.ndarray, kind: str, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Reference final norm in float64 (independent of ``analyses.activations.logit_lens``)."""
    x = np.asarray(x, dtype=np.float64)
    if kind == "layernorm":
        centred = x - x.mean(-1, keepdims=True)
        return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps) * weight + bias
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * weight


def make_wmdp_pair(
    n_questions: int,
    *,
    num_layers: int = 3,
    hidden: int = 8,
    vocab: int = 40,
    norm_kind: str = "rmsnorm",
    seed: int = 0,
    unembedding: np.ndarray | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> tuple[xr.Dataset, xr.Dataset, np.ndarray]:
    """``(wmdp, wmdp_cloze, unembedding)`` built consistently: the final-layer answers stored in
    ``final_letter_logits`` / ``final_cloze_logprob`` are what the model's head gives on ``resid``."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(vocab, hidden)).astype(np.float32) if unembedding is None else unembedding
    weight = (1 + 0.1 * rng.normal(size=hidden)).astype(np.float32)
    bias = (0.1 * rng.normal(size=hidden) if norm_kind == "layernorm" else np.zeros(hidden)).astype(np.float32)
    eps = 1e-5
    common = {"final_norm_kind": norm_kind, "final_norm_eps": eps, **(attrs or {})}

    lengths = random_lengths(n_questions, rng, 4, 9)
    resid = rng.normal(size=(num_layers + 1, int(lengths.sum()), hidden)).astype(np.float32)
    letter_ids = np.array([5, 6, 7, 8], dtype=np.int32)
    letter_unembed = U[letter_ids]
    offsets = _offsets(lengths)
    last_final = resid[num_layers, offsets + lengths - 1]
    final_letter_logits = (final_norm(last_final, norm_kind, weight, bias, eps) @ letter_unembed.T.astype(np.float64))
    answer = rng.integers(0, 4, size=n_questions).astype(np.int8)
    wmdp = make_cache(resid, lengths, split="wmdp", attrs={**common, "split": "wmdp"}, seed=seed, extra={
        "answer": (("sample",), answer),
        "letter_token_ids": (("choice",), letter_ids),
        "letter_unembed": (("choice", "hidden"), letter_unembed.astype(np.float32)),
        "final_letter_logits": (("sample", "choice"), final_letter_logits.astype(np.float32)),
        "final_norm_weight": (("hidden",), weight),
        "final_norm_bias": (("hidden",), bias),
    })

    n_seq = 4 * n_questions
    question = np.repeat(np.arange(n_questions), 4).astype(np.int32)
    choice_index = np.tile(np.arange(4), n_questions).astype(np.int8)
    context = rng.integers(2, 5, size=n_seq)
    cont_len = rng.integers(1, 4, size=n_seq)
    c_lengths = (context + cont_len).astype(np.int32)
    c_resid = rng.normal(size=(num_layers + 1, int(c_lengths.sum()), hidden)).astype(np.float32)
    c_ids = rng.integers(0, vocab, size=int(c_lengths.sum())).astype(np.int32)
    c_offsets = _offsets(c_lengths)
    logprob = np.zeros(n_seq)
    for s in range(n_seq):
        positions = c_offsets[s] + np.arange(context[s] - 1, c_lengths[s] - 1)
        logits = final_norm(c_resid[num_layers, positions], norm_kind, weight, bias, eps) @ U.T.astype(np.float64)
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        logprob[s] = logp[np.arange(len(positions)), c_ids[positions + 1]].mean()
    cloze = make_cache(c_resid, c_lengths, split="wmdp_cloze", input_ids=c_ids, seed=seed + 1,
                       attrs={**common, "split": "wmdp_cloze"}, extra={
        "question": (("sample",), question),
        "choice_index": (("sample",), choice_index),
        "cont_start": (("sample",), context.astype(np.int32)),
        "cont_end": (("sample",), c_lengths),
        "final_cloze_logprob": (("sample",), logprob.astype(np.float32)),
    })
    return wmdp, cloze, U


def llama_tensors(num_layers: int, hidden: int, ff: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with Llama names (enough for the row-space and lens diagnostics)."""
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.normal(size=(vocab, hidden)),
               "model.norm.weight": np.ones(hidden), "lm_head.weight": rng.normal(size=(vocab, hidden))}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "mlp.gate_proj.weight"] = rng.normal(size=(ff, hidden)) / np.sqrt(hidden)
        tensors[prefix + "mlp.up_proj.weight"] = rng.normal(size=(ff, hidden)) / np.sqrt(hidden)
        tensors[prefix + "mlp.down_proj.weight"] = rng.normal(size=(hidden, ff)) / np.sqrt(ff)
        tensors[prefix + "self_attn.q_proj.weight"] = rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)
    return {name: value.astype(np.float32) for name, value in tensors.items()}


def write_checkpoint(path, tensors: Mapping[str, np.ndarray], model_type: str = "llama", **config) -> str:
    """Write ``tensors`` as a local HF directory (config.json + model.safetensors) and return its path."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hidden = next(v.shape[1] for k, v in tensors.items() if "embed" in k)
    config = {"model_type": model_type, "hidden_size": hidden, "tie_word_embeddings": False, **config}
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)
