"""The inputs of analyze: the caches cut to ``--max-samples`` and checked against each other, and
the checkpoints they record."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import xarray as xr

from analyses.activations.caches import LENS_SPLITS, SPLITS
from unlearn_lens.core.errors import UserError

#: caches[model][split] -> lazy Dataset following SCHEMA.md
Caches = Mapping[str, Mapping[str, xr.Dataset]]


def subset_samples(ds: xr.Dataset, max_samples: int | None) -> xr.Dataset:
    """The first ``max_samples`` samples of a split (and exactly their tokens)."""
    if max_samples is None or ds.sizes["sample"] <= max_samples:
        return ds
    if max_samples < 1:
        raise UserError("--max-samples must be at least 1")
    last = max_samples - 1
    end = int(ds["sample_offset"][last].values) + int(ds["sample_length"][last].values)
    return ds.isel(sample=slice(0, max_samples), token=slice(0, end))


def same_tokens(a: xr.Dataset, b: xr.Dataset) -> bool:
    """True when two caches of a split hold the same token ids cut into the same samples."""
    if a.sizes.get("token") != b.sizes.get("token") or a.sizes.get("sample") != b.sizes.get("sample"):
        return False
    return (np.array_equal(a["input_ids"].values, b["input_ids"].values)
            and np.array_equal(a["sample_offset"].values, b["sample_offset"].values))


def validate_caches(caches: Caches, base: str) -> None:
    """Refuse incomplete caches, missing splits, other shapes and caches of other data/tokenisation."""
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
                raise UserError(f"{model}: its {split!r} split was captured on different data or tokenisation than "
                                f"{base}'s (input_ids differ); capture every model with the same --data, "
                                "--max-samples and --max-length")


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
