"""What a cache was captured from: model, weights and tokenizer fingerprints, data, settings."""

from __future__ import annotations

import hashlib
from importlib import metadata
from typing import Any

from analyses.weights.checkpoints import checkpoint_fingerprint
from cache_store.tokenizer_id import tokenizer_fingerprint
from unlearn_lens.core.models import resolve_source

_PACKAGES = ("unlearn-lens", "torch", "transformers", "nnsight", "zarr", "numpy", "xarray")


def weights_fingerprint(model) -> str:
    """sha256 over every parameter and buffer (name, shape, dtype, bytes): changes with any weight."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not torch.is_tensor(tensor):
            continue
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def versions() -> dict[str, str]:
    found = {}
    for package in _PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def provenance(spec: str, revision: str | None, model, tokenizer, adapter, *, data_hash: str,
               max_length: int, dtype: str) -> dict[str, Any]:
    """Root attributes of a cache (SCHEMA.md, "Attributes")."""
    source = resolve_source(spec)
    norm = adapter.final_norm_description()
    return {
        "model": spec,
        "model_path": str(source.path) if source.path is not None else spec,
        "revision": revision,
        "family": adapter.family,
        "num_layers": adapter.num_layers,
        "hidden_size": int(model.config.hidden_size),
        "vocab_size": int(adapter.unembed().weight.shape[0]),
        "weights_fingerprint": weights_fingerprint(model),
        "checkpoint_fingerprint": checkpoint_fingerprint(spec, revision),  # what analyze checks, torch-free
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data_manifest_hash": data_hash,
        "max_length": int(max_length),
        "dtype": dtype,
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "final_norm_kind": norm["kind"],
        "final_norm_eps": norm["eps"],
        "versions": versions(),
    }
