"""Reading caches as lazy xarray Datasets (the contract in SCHEMA.md), one model or several."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

from cache_store import store as stores
from cache_store.layout import SplitLayout
from unlearn_lens.core.errors import UserError

#: Variables that describe the data, identical across models of one comparison (never stacked).
SHARED_VARIABLES = ("input_ids", "attention_mask", "token_sample", "token_position", "sample_offset",
                    "sample_length", "text_input_ids", "text_offset", "text_length", "answer", "question",
                    "choice_index", "cont_start", "cont_end")
#: Root attributes that are the same for every split; copied into each split's Dataset.
_INTERNAL_ATTRS = ("splits", "format_version", "initialised")


def list_splits(url: str) -> list[str]:
    """Names of the split groups in a cache (complete or not)."""
    root = stores.open_root(url, consolidated=None)
    return sorted(root.group_keys())


def _split_attrs(url: str, split: str, store: Any = None) -> dict[str, Any]:
    root = stores.open_root(url, consolidated=None, store=store)
    if split not in root.group_keys():
        have = ", ".join(sorted(root.group_keys())) or "none"
        raise UserError(f"{url}: no split {split!r} in this cache (it has: {have})")
    return {**dict(root.attrs), **dict(root[split].attrs)}


def is_complete(url: str, split: str | None = None) -> bool:
    """True when ``split`` (default: every split of the cache) finished capturing."""
    if not stores.exists(url):
        return False
    splits = [split] if split else list_splits(url)
    if not splits:
        return False
    root = stores.open_root(url, consolidated=None)
    return all(s in root.group_keys() and bool(root[s].attrs.get("complete")) for s in splits)


def layout_of(attrs: Mapping[str, Any], lengths: np.ndarray) -> SplitLayout:
    """Rebuild a split's on-disk layout from its attributes and sample lengths."""
    return SplitLayout(np.asarray(lengths), int(attrs["block_samples"]), int(attrs["token_chunk"]))


#: A whole-cache scan's dask task reads about this much and holds at most SCAN_MOMENT_BYTES of
#: per-layer float64 d x d statistics (covariance partials), one layer at a time from d = 2896 up.
SCAN_READ_BYTES = 8 << 20
SCAN_MOMENT_BYTES = 64 << 20


def scan_layers_per_chunk(token_chunk: int, hidden: int, itemsize: int, n_layers: int) -> int:
    """Stored layers per dask chunk for a whole-cache scan (see ``SCAN_READ_BYTES``)."""
    by_read = SCAN_READ_BYTES // max(token_chunk * hidden * itemsize, 1)
    by_moments = SCAN_MOMENT_BYTES // (8 * hidden * hidden)
    return int(max(1, min(by_read, by_moments, n_layers)))


def open_cache(url: str, split: str, *, allow_incomplete: bool = False, keep_slack: bool = False,
               layers_per_chunk: int | str = 1):
    """Lazy, dask-backed ``xarray.Dataset`` of one split of a cache (see SCHEMA.md).

    An incomplete cache (capture still running or interrupted) raises ``UserError`` unless
    ``allow_incomplete``. ``keep_slack`` returns the raw on-disk token axis (with the
    block-alignment slack, ``attention_mask`` 0) instead of real tokens only.
    ``layers_per_chunk`` groups that many stored layers into one dask chunk: 1 (the default)
    keeps selecting a layer as cheap as reading its chunks; ``"scan"`` sizes chunks for reading
    everything (``scan_layers_per_chunk``: fewer, larger tasks read 2-3x faster).
    """
    import xarray as xr

    store = stores.metadata_once(stores.store_for(url, read_only=True), str(url))  # one metadata request
    attrs = _split_attrs(url, split, store)
    complete = bool(attrs.get("complete"))
    if not complete and not allow_incomplete:
        raise UserError(
            f"{url}: split {split!r} is incomplete (capture interrupted or still running); rerun the same "
            "`unlearn-lens capture` command to finish it"
        )
    if layers_per_chunk == "scan":
        needed = ("token_chunk", "hidden_size", "dtype", "num_layers")
        layers_per_chunk = scan_layers_per_chunk(
            int(attrs["token_chunk"]), int(attrs["hidden_size"]), np.dtype(attrs["dtype"]).itemsize,
            int(attrs["num_layers"]) + 1) if all(key in attrs for key in needed) else 1
    chunks = {} if layers_per_chunk == 1 else {"layer": layers_per_chunk, "mlp_layer": layers_per_chunk}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = xr.open_zarr(store, group=split, chunks=chunks, consolidated=None, zarr_format=3)
    ds = ds.drop_vars([v for v in ("block_done",) if v in ds.variables])
    ds.attrs = {k: v for k, v in attrs.items() if k not in _INTERNAL_ATTRS}
    lengths = ds["sample_length"].values
    if not keep_slack:
        ds = _drop_slack(ds, layout_of(attrs, lengths))
        ds = _with_text(ds)
    coords = {"sample": np.arange(ds.sizes["sample"]), "token": np.arange(ds.sizes["token"])}
    coords.update(captured_layers(attrs, ds.sizes))
    if "choice" in ds.dims:
        coords["choice"] = np.arange(ds.sizes["choice"])
    return ds.assign_coords(coords)


def captured_layers(attrs: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The ``layer`` and ``mlp_layer`` coordinates: the layers the capture kept (all of them unless
    the split's ``selection`` says otherwise, SCHEMA.md)."""
    selection = attrs.get("selection") or {}
    coords = {}
    for dim, key in (("layer", "resid_layers"), ("mlp_layer", "mlp_layers")):
        if dim in sizes:
            values = np.asarray(selection.get(key, np.arange(sizes[dim])), dtype=np.int64)
            if len(values) != sizes[dim]:
                raise UserError(f"split {attrs.get('split')!r}: its selection names {len(values)} {dim}s but its "
                                f"arrays hold {sizes[dim]}; the cache is damaged (`unlearn-lens cache verify`)")
            coords[dim] = values
    return coords


def _with_text(ds):
    """Every token id of every sample (``text_input_ids``, ``text_offset``, ``text_length``): stored by a
    token-sampled capture, the token axis itself otherwise."""
    if "text_input_ids" not in ds.variables:
        ds["text_input_ids"] = ("text_token", ds["input_ids"].data)
        ds["text_length"] = ds["sample_length"]
    lengths = np.asarray(ds["text_length"].values, dtype=np.int64)
    ds["text_offset"] = ("sample", np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
    return ds


def _drop_slack(ds, layout: SplitLayout):
    """Keep real tokens only: offsets then count real tokens, as SCHEMA.md promises.

    Each block's real tokens are one contiguous, chunk-aligned run: slicing the runs and joining
    them keeps every task a plain slice of one stored chunk (an index array would add a
    gather per chunk, halving read throughput).
    """
    import xarray as xr

    ranges = layout.real_token_ranges()
    if sum(stop - start for start, stop in ranges) != ds.sizes["token"]:
        parts = [ds.isel(token=slice(start, stop)) for start, stop in ranges]
        ds = xr.concat(parts, dim="token", data_vars="minimal", coords="minimal", compat="override",
                       join="override") if len(parts) > 1 else parts[0]
    offsets = np.concatenate([[0], np.cumsum(layout.lengths)[:-1]]).astype(np.int64)
    ds["sample_offset"] = ("sample", offsets)
    ds["attention_mask"] = ds["attention_mask"].astype(np.int8)
    return ds


def _short(values) -> str:
    values = [int(v) for v in values]
    return ",".join(map(str, values)) if len(values) <= 8 else f"{values[0]}..{values[-1]} ({len(values)})"


def open_caches(urls: Mapping[str, str], split: str, *, allow_incomplete: bool = False):
    """Several models' caches of one split stacked along a leading ``model`` dimension.

    Refuses (``UserError``) unless all were captured from the same data with identical token ids,
    so that token ``t`` means the same thing in every model. Data-describing variables (token ids,
    offsets, answers...) are shared; activations, logits and model-specific vectors are stacked.
    ``attrs["models"]`` holds each model's own attributes.
    """
    import xarray as xr

    if not urls:
        raise UserError("open_caches needs at least one cache")
    names = list(urls)
    datasets = [open_cache(urls[name], split, allow_incomplete=allow_incomplete) for name in names]
    first = datasets[0]
    for name, ds in zip(names[1:], datasets[1:]):
        where = f"{urls[names[0]]!s} ({names[0]}) and {urls[name]!s} ({name})"
        for key in ("data_manifest_hash", "max_length"):
            if ds.attrs.get(key) != first.attrs.get(key):
                raise UserError(f"{where} were captured from different data ({key} differs); capture both from the same --data")
        for key in ("num_layers", "hidden_size"):
            if ds.attrs.get(key) != first.attrs.get(key):
                raise UserError(f"{where} have different architectures ({key} differs) and cannot be stacked")
        if ds.sizes.get("text_token") != first.sizes.get("text_token") or \
                ds.sizes["sample"] != first.sizes["sample"] or not (
                    np.array_equal(ds["text_input_ids"].values, first["text_input_ids"].values)
                    and np.array_equal(ds["text_length"].values, first["text_length"].values)):
            raise UserError(f"{where} hold different token ids (other tokenizer, data or --max-samples); "
                            "they cannot be compared token by token")
        same_positions = ds.sizes["token"] == first.sizes["token"] and np.array_equal(
            ds["token_position"].values, first["token_position"].values)
        if not same_positions:
            raise UserError(f"{where} kept different token positions (--token-sample or its --seed differ); "
                            "capture both with the same ones")
        arrays = {name for name in ("resid", "mlp_in") if name in ds.variables}
        if arrays != {name for name in ("resid", "mlp_in") if name in first.variables}:
            raise UserError(f"{where} recorded different arrays (--variables differ); capture both with the same ones")
        for dim in ("layer", "mlp_layer"):
            if dim in ds.dims and dim in first.dims and not np.array_equal(ds[dim].values, first[dim].values):
                raise UserError(f"{where} kept different layers ({dim} {_short(first[dim].values)} and "
                                f"{_short(ds[dim].values)}); capture both with the same --layers")
    shared = [v for v in SHARED_VARIABLES if v in first.variables]
    stacked = xr.concat([ds.drop_vars(shared) for ds in datasets], dim="model", combine_attrs="drop_conflicts",
                        coords="minimal", compat="override", join="exact")
    stacked = stacked.assign_coords(model=names)
    for name in shared:
        stacked[name] = first[name]
    stacked.attrs = {k: v for k, v in first.attrs.items()
                     if all(ds.attrs.get(k) == v for ds in datasets)}
    stacked.attrs["models"] = {name: dict(ds.attrs) for name, ds in zip(names, datasets)}
    return stacked
