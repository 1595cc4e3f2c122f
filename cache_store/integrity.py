"""Chunk checksums and presence: find a damaged or missing chunk by its key, and hand its blocks
back to ``capture``.

Every chunk written by format 2 on ends with a crc32c of its compressed bytes (``writer.compressors``).
Checking it needs the raw bytes only, not the decoder, so a damaged chunk is named by its store key
(``forget/resid/c/3/2/0``) whatever would have happened when decoding it. A cache writes every
chunk, so a missing one is damage too (readers refuse it: ``metadata_store.MissingChunkError``).
Caches written before checksums still open; their arrays are reported as unchecked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from cache_store import store as stores
from unlearn_lens.core.errors import UserError

#: Arrays filled block by block by the forward passes; all others are static (written at creation).
DYNAMIC_ARRAYS = ("resid", "mlp_in", "last", "final_letter_logits", "final_cloze_logprob")
#: Raw chunks fetched per request batch (fsspec fetches a batch concurrently on object stores).
FETCH_BATCH = 32


@dataclass
class ChecksumReport:
    """What a checksum pass found: damaged and missing chunk keys, arrays without checksums."""

    damaged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    checked: int = 0


def has_checksums(array: Any) -> bool:
    """True when the array's codec chain ends with zarr's crc32c codec."""
    return any(type(codec).__name__ == "Crc32cCodec" for codec in array.metadata.codecs)


def chunk_keys(array: Any) -> Iterator[tuple[tuple[int, ...], str]]:
    """Every chunk's grid coordinates and key (relative to the array) in C order."""
    for coords in np.ndindex(*array.cdata_shape):
        yield coords, array.metadata.encode_chunk_key(coords)


def checksum_ok(data: bytes) -> bool:
    """The last 4 bytes are the little-endian crc32c of the others (zarr's crc32c codec)."""
    import google_crc32c

    if len(data) < 4:
        return False
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def check_split(url: str, split: str, group: Any, progress: Callable | None = None) -> ChecksumReport:
    """Read every chunk of one split's arrays raw: name the missing ones and those failing their checksum.

    Every chunk of a cache is written (all-zero ones included), so an absent one is damage; the
    only exception is ``block_done``, whose chunks exist for finished blocks only (all of them
    once the split is complete).
    """
    import fsspec

    report = ChecksumReport()
    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    complete = bool(group.attrs.get("complete"))
    for name, array in sorted(group.arrays()):
        checked = has_checksums(array)
        if not checked:
            report.unchecked.append(f"{split}/{name}")
        keys = [f"{split}/{name}/{key}" for _, key in chunk_keys(array)]
        for start in range(0, len(keys), FETCH_BATCH):
            batch = keys[start:start + FETCH_BATCH]
            found = fs.cat([f"{root}/{key}" for key in batch], on_error="return")
            for key in batch:
                data = found.get(f"{root}/{key}", found.get(fs._strip_protocol(f"{root}/{key}")))
                if data is None or isinstance(data, BaseException):
                    if complete or not (name == "block_done" and isinstance(data, (FileNotFoundError, type(None)))):
                        report.missing.append(key)  # block_done chunks exist only for done blocks
                elif checked and not checksum_ok(data):
                    report.damaged.append(key)
                report.checked += 1
                if progress:
                    progress()
    return report


def damaged_chunks(url: str, splits: Iterable[str] | None = None) -> list[str]:
    """Keys of every chunk whose checksum fails, over the given splits (default: all)."""
    root = stores.open_root(url, consolidated=None)
    names = sorted(root.group_keys()) if splits is None else list(splits)
    return [key for split in names if split in root.group_keys()
            for key in check_split(url, split, root[split]).damaged]


def is_checksum_error(exc: BaseException) -> bool:
    """True for zarr's crc32c mismatch (raised while decoding a chunk), wherever it was wrapped."""
    seen: BaseException | None = exc
    while seen is not None:
        if "checksum do not match" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def name_damaged_chunks(urls: Iterable[str]) -> Iterator[None]:
    """Turn a checksum failure while computing into a one-line ``UserError`` naming the chunk.

    The decoder does not know the chunk's key, so on failure the caches are scanned (raw bytes and
    checksums only) to find it. Nothing is computed on a damaged chunk: the failure stops the run.
    """
    urls = list(urls)
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not is_checksum_error(exc):
            raise
        for url in urls:
            damaged = damaged_chunks(url)
            if damaged:
                more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
                raise UserError(
                    f"{url}: chunk {damaged[0]} is damaged (checksum mismatch){more}; run `unlearn-lens cache "
                    f"verify {url} --reset-damaged`, then rerun its capture command") from None
        raise UserError(f"a cache chunk failed its checksum ({exc}); run `unlearn-lens cache verify` on each cache") from None


def block_of(group: Any, name: str, coords: tuple[int, ...]) -> int | None:
    """The block that owns a chunk of a dynamic array or of ``block_done``; None for static arrays."""
    attrs = dict(group.attrs)
    array = group[name]
    dims = list(array.metadata.dimension_names or ())
    if name == "block_done":
        return coords[0]
    if name not in DYNAMIC_ARRAYS:
        return None
    if "token" in dims:
        from cache_store.layout import SplitLayout

        layout = SplitLayout(np.asarray(group["sample_length"][...]), int(attrs["block_samples"]),
                             int(attrs["token_chunk"]))
        start = coords[dims.index("token")] * array.chunks[dims.index("token")]
        return int(np.searchsorted(layout.block_starts, start, side="right") - 1)
    return coords[dims.index("sample")] * array.chunks[dims.index("sample")] // int(attrs["block_samples"])


def reset_damaged(url: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Mark the blocks holding damaged or missing chunks as not written (static damage: the split
    uninitialised).

    Rerunning the same ``capture`` command then rewrites exactly those blocks (and the split's
    static arrays when one of them was damaged), byte-identical to an undamaged capture. Returns,
    per split, ``{"blocks": [...], "static": bool}``.
    """
    import fsspec

    stores.refuse_read_only(url)
    stores.drop_consolidated(url)  # the split is about to change state
    root = stores.open_root(url, mode="r+")
    fs, base = fsspec.core.url_to_fs(str(url))
    base = base.rstrip("/")
    reset: dict[str, dict[str, Any]] = {}
    for key in keys:
        split, name, chunk = key.split("/", 2)
        group = root[split]
        entry = reset.setdefault(split, {"blocks": [], "static": False})
        block = block_of(group, name, tuple(int(part) for part in chunk.split("/")[1:]))
        if block is None:
            group.attrs.update({"initialised": False, "complete": False})
            entry["static"] = True
            continue
        path = f"{base}/{split}/block_done/{group['block_done'].metadata.encode_chunk_key((block,))}"
        if fs.exists(path):
            fs.rm(path)
        group.attrs["complete"] = False
        if block not in entry["blocks"]:
            entry["blocks"] = sorted(entry["blocks"] + [block])
    return reset
