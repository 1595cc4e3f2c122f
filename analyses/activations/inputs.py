"""The inputs of analyze: the caches cut to ``--max-samples`` and checked against each other, and
the checkpoints they record."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import xarray as xr

from analyses.activations.caches import LENS_SPLITS, SPLITS
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_counts

#: caches[model][split] -> lazy Dataset following SCHEMA.md
Caches = Mapping[str, Mapping[str, xr.Dataset]]


def subset_samples(ds: xr.Dataset, max_samples: int | None) -> xr.Dataset:
    """The first ``max_samples`` samples of a split (and exactly their tokens)."""
    if max_samples is None or ds.sizes["sample"] <= max_samples:
        return ds
    check_counts(max_samples=max_samples)
    last = max_samples - 1
    end = int(ds["sample_offset"][last].values) + int(ds["sample_length"][last].values)
    return ds.isel(sample=slice(0, max_samples), token=slice(0, end))


def same_tokens(a: xr.Dataset, b: xr.Dataset) -> bool:
    """True when two caches of a split hold the same token ids cut into the same samples, at the same
    kept positions (``--token-sample``)."""
    if a.sizes.get("token") != b.sizes.get("token") or a.sizes.get("sample") != b.sizes.get("sample"):
        return False
    return (np.array_equal(a["input_ids"].values, b["input_ids"].values)
            and np.array_equal(a["sample_offset"].values, b["sample_offset"].values)
            and np.array_equal(a["token_position"].values, b["token_position"].values))


def kept_layers(ds: xr.Dataset) -> dict[str, list[int]]:
    """The residual and MLP-input layers a split holds (its ``layer`` / ``mlp_layer`` coordinates)."""
    return {dim: [int(v) for v in ds[dim].values] for dim in ("layer", "mlp_layer") if dim in ds.dims}


def _layer_text(layers: dict[str, list[int]]) -> str:
    return "; ".join(f"{dim} {','.join(map(str, values))}" for dim, values in layers.items())


def validate_caches(caches: Caches, base: str) -> None:
    """Refuse incomplete caches, missing splits, other shapes and caches of other data/tokenisation,
    and partial caches (``capture --layers/--token-sample/--variables``) that do not keep the same
    layers, positions and arrays: nothing is ever computed on mixed layers."""
    if base not in caches:
        raise UserError(f"no cache for the base model {base!r}")
    if len(caches) < 2:
        raise UserError("nothing to compare: give at least one --compare NAME=CACHE")
    for model, splits in caches.items():
        for split in SPLITS:
            if split not in splits:
                raise UserError(f"{model}: the cache has no {split!r} split; capture it (--splits forget,retain,wmdp)")
        for split, ds in splits.items():
            if not bool(ds.attrs.get("complete", False)):
                raise UserError(f"{model}: the {split!r} split of the cache is incomplete; rerun its capture to finish it")
    reference = caches[base]["forget"]
    layers = kept_layers(reference)
    arrays = [name for name in ("resid", "mlp_in") if name in reference.variables]
    for model, splits in caches.items():
        for split, ds in splits.items():
            if "resid" not in ds.variables:
                raise UserError(f"{model}: its {split!r} split records no residual stream (captured with "
                                "--variables mlp_in); analyze needs resid: capture with --variables resid[,mlp_in]")
            if kept_layers(ds) != layers:
                raise UserError(f"{model}: its {split!r} split keeps {_layer_text(kept_layers(ds))}, {base}'s forget "
                                f"split {_layer_text(layers)}; capture every model and split with the same --layers")
            if [name for name in ("resid", "mlp_in") if name in ds.variables] != arrays:
                raise UserError(f"{model}: its {split!r} split records other arrays than {base}'s forget split "
                                f"({', '.join(arrays)}); capture every model with the same --variables")
    for model, splits in caches.items():
        ds = splits["forget"]
        for key in ("layer", "mlp_layer", "hidden"):
            if ds.sizes.get(key) != reference.sizes.get(key):
                raise UserError(f"{model}: its cache has {ds.sizes.get(key)} {key} entries, {base}'s has "
                                f"{reference.sizes.get(key)}; compare models of the same architecture")
        if model == base:
            continue
        for split in SPLITS + LENS_SPLITS:
            if split in splits and split in caches[base] and not same_tokens(caches[base][split], splits[split]):
                raise UserError(f"{model}: its {split!r} split was captured on different data or tokenisation (or "
                                f"token sample) than {base}'s (input_ids or kept positions differ); capture every "
                                "model with the same --data, --max-samples, --max-length and --token-sample/--seed")


def open_checkpoints(caches: Caches, checkpoints: Mapping[str, Any] | None,
                     opener: Callable[..., Any] | None) -> dict[str, Any]:
    """Each model's checkpoint: given, or opened from the cache's ``model_path`` and ``revision``."""
    opened = dict(checkpoints or {})
    for model, splits in caches.items():
        if model in opened:
            continue
        attrs = splits["forget"].attrs
        path = attrs.get("model_path") or attrs.get("model")
        if not path:
            raise UserError(f"{model}: the cache records no model_path, so its checkpoint cannot be read")
        if opener is None:
            from analyses.weights.checkpoints import open_checkpoint as opener
        opened[model] = opener(str(path), attrs.get("revision") or None)
    return opened


def check_weights(caches: Caches, opened: Mapping[str, Any], allow_mismatch: bool = False) -> dict[str, Any]:
    """Refuse a checkpoint that is not the one its cache was captured from; returns each model's
    ``{"checkpoint": fingerprint, "cache": recorded}`` (None where either side has none).

    The cache records ``checkpoint_fingerprint`` at capture; another model's weights (a wrong
    ``--checkpoint``, a model folder retrained in place after its capture) would otherwise be read
    as this model's dW and silently change the row-space diagnostics. ``allow_mismatch`` compares
    them anyway, on purpose (the fingerprints are then recorded in the outputs' markers).
    """
    found: dict[str, Any] = {}
    for model, splits in caches.items():
        recorded = splits["forget"].attrs.get("checkpoint_fingerprint")
        fingerprint = getattr(opened[model], "fingerprint", None)
        actual = fingerprint() if recorded and callable(fingerprint) else None
        found[model] = {"checkpoint": actual, "cache": recorded}
        if actual is not None and actual != recorded and not allow_mismatch:
            raise UserError(
                f"{model}: {getattr(opened[model], 'path', 'the checkpoint')} is not the checkpoint its cache was "
                f"captured from (its weights' fingerprint is {actual}, the cache records {recorded}); give "
                f"--checkpoint {model}=MODEL with the weights that were captured, recapture the cache, or pass "
                "--allow-mismatch to combine them on purpose")
    return found
