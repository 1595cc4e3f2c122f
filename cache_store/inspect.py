"""Describe and check a cache without loading any model: provenance, sizes, integrity."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cache_store import store as stores
from cache_store.layout import SplitLayout
from unlearn_lens.core.errors import UserError

TOKEN_ACTIVATIONS = ("resid", "mlp_in")


def describe(url: str) -> dict[str, Any]:
    """Provenance and, per split, variables, sizes on disk and compression ratio."""
    root = stores.open_root(url, consolidated=None)
    report: dict[str, Any] = {"url": str(url), "provenance": dict(root.attrs), "splits": {}}
    for split in sorted(root.group_keys()):
        group = root[split]
        attrs = dict(group.attrs)
        variables, stored, raw = {}, 0, 0
        real_share = int(attrs.get("n_tokens_real", 0)) / max(1, int(attrs.get("n_tokens_stored", 1)))
        for name, array in sorted(group.arrays()):
            nbytes_stored = int(array.nbytes_stored())
            dims = list(array.metadata.dimension_names or ())
            real_bytes = int(array.nbytes * (real_share if "token" in dims else 1))  # slack excluded
            variables[name] = {"dims": dims, "shape": list(array.shape), "dtype": str(array.dtype),
                               "chunks": list(array.chunks), "bytes_stored": nbytes_stored,
                               "bytes_real": real_bytes}
            stored += nbytes_stored
            raw += real_bytes
        done = np.asarray(group["block_done"][...]) if "block_done" in group.array_keys() else np.zeros(0)
        real = int(attrs.get("n_tokens_real", 0))
        per_token = {}
        for name in TOKEN_ACTIVATIONS:
            if name in variables and real:
                layers = variables[name]["shape"][0]
                per_token[name] = variables[name]["bytes_stored"] / real / layers
        report["splits"][split] = {
            "complete": bool(attrs.get("complete")), "blocks_done": f"{int(done.sum())}/{len(done)}",
            "samples": attrs.get("n_samples"), "tokens_real": real, "tokens_stored": attrs.get("n_tokens_stored"),
            "bytes_stored": stored, "bytes_uncompressed_real": raw,
            "compression_ratio": raw / stored if stored else float("nan"),
            "bytes_per_real_token_per_layer": per_token, "variables": variables,
            "selection": attrs.get("selection"),
        }
    return report


def verify(url: str, progress: Callable | None = None, notes: list[str] | None = None,
           damaged: list[str] | None = None) -> list[str]:
    """Every problem found in a cache (empty when it is complete and sound).

    Checks every chunk's checksum and presence (naming a damaged or missing chunk by its key),
    completeness, that every chunk decodes, that offsets, masks and sample ids agree with the layout, that
    activations are finite, and that ``last`` is the state at each sample's last token. Remarks
    that are not problems (arrays written without checksums) are appended to ``notes``; the keys
    of damaged and missing chunks (what ``integrity.reset_damaged`` takes) to ``damaged``.
    """
    from cache_store.integrity import check_split

    root = stores.open_root(url, consolidated=None)
    splits = sorted(root.group_keys())
    if not splits:
        return [f"{url}: no splits"]
    problems: list[str] = []
    for split in splits:
        sums = check_split(url, split, root[split], progress)
        if sums.unchecked and notes is not None:
            notes.append(f"{split}: no checksums in {', '.join(n.split('/', 1)[1] for n in sums.unchecked)} "
                         "(written before format 2): damage there cannot be detected")
        if damaged is not None:
            damaged += sums.damaged + sums.missing
        if sums.damaged or sums.missing:  # the value checks below would only fail again on the same chunks
            problems += [f"{key}: damaged chunk (checksum mismatch)" for key in sums.damaged]
            problems += [f"{key}: missing chunk" for key in sums.missing]
            continue
        try:
            problems += _verify_split(root[split], split, progress)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to read is a finding
            problems.append(f"{split}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return problems


def _verify_split(group, split: str, progress: Callable | None) -> list[str]:
    attrs = dict(group.attrs)
    problems = []
    if not attrs.get("complete"):
        problems.append(f"{split}: not complete (capture interrupted or still running)")
    done = np.asarray(group["block_done"][...])
    if not done.all():
        problems.append(f"{split}: {int((~done.astype(bool)).sum())} of {len(done)} blocks not written")
    for name, array in sorted(group.arrays()):
        if array.nchunks_initialized != array.nchunks:
            problems.append(f"{split}/{name}: {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks missing")
    lengths = np.asarray(group["sample_length"][...])
    try:
        layout = SplitLayout(lengths, int(attrs["block_samples"]), int(attrs["token_chunk"]))
    except (UserError, KeyError, ValueError) as exc:
        return problems + [f"{split}: inconsistent layout ({exc})"]
    offset_problems = _check_offsets(group, split, layout)
    if offset_problems:
        return problems + offset_problems
    last = np.asarray(group["last"][...]) if "last" in group.array_keys() else None
    last_token = layout.offsets + layout.lengths - 1
    for name in (n for n in TOKEN_ACTIVATIONS if n in group.array_keys()):  # --variables may leave one out
        problems += _check_activations(group[name], f"{split}/{name}", layout, last if name == "resid" else None,
                                       last_token, progress)
    for name, array in sorted(group.arrays()):
        if name not in TOKEN_ACTIVATIONS and array.dtype.kind == "f":
            values = np.asarray(array[...])
            if not np.isfinite(values).all():
                problems.append(f"{split}/{name}: non-finite values")
    return problems


def _check_offsets(group, split: str, layout: SplitLayout) -> list[str]:
    problems = []
    offsets = np.asarray(group["sample_offset"][...])
    if not np.array_equal(offsets, layout.offsets):
        problems.append(f"{split}: sample_offset disagrees with the layout")
    sampled = bool((group.attrs.get("selection") or {}).get("token_sample"))
    for name, expected in layout.token_arrays().items():
        values = np.asarray(group[name][...])
        if sampled and name == "token_position":  # the kept positions: rising inside a text, its last among them
            problems += _check_sampled_positions(group, split, layout, values)
            continue
        if values.shape != expected.shape or not np.array_equal(values, expected):
            problems.append(f"{split}: {name} disagrees with sample offsets and lengths")
    for name in ("resid", "mlp_in", "input_ids"):
        if name in group.array_keys() and group[name].shape[-2 if name != "input_ids" else 0] != layout.n_tokens:
            problems.append(f"{split}/{name}: token axis has the wrong length")
    return problems


def _check_sampled_positions(group, split: str, layout: SplitLayout, positions: np.ndarray) -> list[str]:
    """A token-sampled split: each text's kept positions rise, lie inside it and end with its last token."""
    lengths = np.asarray(group["text_length"][...])
    for sample, (start, count) in enumerate(zip(layout.offsets, layout.lengths)):
        kept = positions[start:start + count]
        if not (np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] == lengths[sample] - 1):
            return [f"{split}: token_position of sample {sample} is not a rising sample of its positions ending "
                    "with its last token"]
    return []


def _check_activations(array, where: str, layout: SplitLayout, last, last_token: np.ndarray,
                       progress: Callable | None) -> list[str]:
    problems = []
    chunk = array.chunks[1]
    steps = range(0, array.shape[1], chunk)
    for layer in range(array.shape[0]):
        for start in steps:
            stop = min(start + chunk, array.shape[1])
            try:
                values = np.asarray(array[layer, start:stop])
            except Exception as exc:  # noqa: BLE001
                key = array.metadata.encode_chunk_key((layer, start // chunk, 0))
                problems.append(f"{where}/{key}: chunk (layer {layer}, tokens {start}:{stop}) unreadable "
                                f"({type(exc).__name__})")
                continue
            if not np.isfinite(values).all():
                problems.append(f"{where}: non-finite values in layer {layer}, tokens {start}:{stop}")
            if last is not None:
                inside = np.flatnonzero((last_token >= start) & (last_token < stop))
                if inside.size and not np.array_equal(values[last_token[inside] - start], last[layer, inside]):
                    problems.append(f"{where}: 'last' disagrees with the residual stream in layer {layer}")
            if progress:
                progress()
    return problems
