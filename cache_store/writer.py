"""Writing a cache: create or resume a store, then fill it block by block from a background thread.

The capture loop (``unlearn_lens.capture``) hands each batch's numpy arrays to ``SplitWriter``;
a writer thread compresses and writes them behind a bounded queue, so disk and compression
overlap the next forward pass. Token-axis data is buffered until whole chunks are available, so
every chunk is written once, and never outside the block that owns it (see ``layout``). A block
is recorded in ``block_done`` only after all its chunks are written; a cache is marked
``complete`` only when every block is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from cache_store import store as stores
from cache_store.layout import SplitLayout
from unlearn_lens.core.errors import UserError

#: 2: a crc32c checksum after every chunk's zstd bytes; block_done chunks written only when done.
FORMAT_VERSION = 2

#: Root attributes that identify what a cache holds; any difference means another capture.
IDENTITY_KEYS = ("family", "num_layers", "hidden_size", "weights_fingerprint", "tokenizer_fingerprint",
                 "data_manifest_hash", "max_length", "dtype", "model_dtype")
#: Split attributes that identify a split's content and layout.
SPLIT_IDENTITY_KEYS = ("layout_fingerprint", "content_fingerprint")

QUEUE_BATCHES = 4


def compressors() -> list:
    """zstd level 1, then a crc32c checksum of the compressed bytes (4 bytes per chunk).

    zstd-1 was chosen by measurement on SmolLM2 float16 activations (benchmarks/RESULTS.md). float16
    barely compresses, so a flipped byte would decode into a wrong value: the checksum makes any
    damaged chunk fail to decode instead (``cache verify`` names it).
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=1), Crc32cCodec()]


@dataclass(frozen=True)
class Dynamic:
    """An array filled by the forward passes: dims (``token`` or ``sample`` among them) and dtype."""

    dims: tuple[str, ...]
    dtype: str

    @property
    def axis_dim(self) -> str:
        return "token" if "token" in self.dims else "sample"

    @property
    def axis(self) -> int:
        return self.dims.index(self.axis_dim)


def _index(ndim: int, axis: int, start: int, stop: int) -> tuple:
    selection = [slice(None)] * ndim
    selection[axis] = slice(start, stop)
    return tuple(selection)


def _slice(values: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """A view of ``values[start:stop]`` along ``axis``."""
    return values[_index(values.ndim, axis, start, stop)]


def content_fingerprint(token_ids: np.ndarray) -> str:
    """sha256 prefix of the concatenated token ids of a split."""
    return hashlib.sha256(np.ascontiguousarray(token_ids, dtype="<i4").tobytes()).hexdigest()[:16]


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if found.get(key) != wanted.get(key)]


class CacheWriter:
    """One model's cache at ``url``: created, or checked against ``provenance`` and resumed."""

    def __init__(self, url: str, provenance: Mapping[str, Any], *, overwrite: bool = False):
        stores.refuse_read_only(url)
        self.url = str(url)
        self.provenance = dict(provenance)
        self.overwrite = overwrite

    # --- creation / resumption -----------------------------------------------------------
    # Local caches serialise creation with a lock. Remote ones (s3://...) have none, so every
    # creation step is idempotent and deletes nothing: concurrent shards write identical metadata
    # and static arrays, and each shard then writes only its own blocks' chunks (SCHEMA.md).
    def _root(self) -> Any:
        if stores.exists(self.url):
            root = stores.open_root(self.url, mode="r+")
            differs = _differences(dict(root.attrs), self.provenance, IDENTITY_KEYS)
            if not differs:
                return root
            if not self.overwrite:
                raise UserError(
                    f"{self.url} holds a capture with other provenance (differs in: {', '.join(differs)}); "
                    "pass --overwrite to replace it, or choose another --out"
                )
            stores.remove(self.url)
        from zarr.errors import ContainsGroupError

        with _quiet():
            try:
                zarr_group(self.url, {**self.provenance, "format_version": FORMAT_VERSION})
            except ContainsGroupError:  # another shard created it a moment ago: same provenance
                pass
        return stores.open_root(self.url, mode="r+")

    def open_split(
        self,
        split: str,
        layout: SplitLayout,
        *,
        sizes: Mapping[str, int],
        static: Mapping[str, tuple[tuple[str, ...], np.ndarray]],
        dynamic: Mapping[str, Dynamic],
        attrs: Mapping[str, Any],
    ) -> "SplitWriter":
        """Create (or find, with identical content and layout) the group of one split.

        ``static`` arrays are known before any forward pass (token ids, offsets, answers...) and
        written here; ``dynamic`` arrays are filled through the returned writer.
        """
        split_attrs = {**attrs, "split": split, "n_samples": layout.n_samples,
                       "n_tokens_real": layout.n_real_tokens, "n_tokens_stored": layout.n_tokens,
                       "n_blocks": layout.n_blocks, "block_samples": layout.block_samples,
                       "token_chunk": layout.token_chunk, "layout_fingerprint": layout.fingerprint()}
        with stores.lock(self.url):
            root = self._root()
            group = self._existing_group(root, split, split_attrs)
            if group is None:
                group = self._create_group(root, split, layout, sizes, static, dynamic, split_attrs)
        return SplitWriter(self.url, split, layout, group, dynamic)

    def _existing_group(self, root: Any, split: str, split_attrs: Mapping[str, Any]) -> Any:
        """The split's group when it is initialised with this content and layout, else None.

        A group still being initialised (by a killed run, or by another shard right now) with the
        same identity is left in place: creating it again is idempotent.
        """
        if split not in root.group_keys():
            return None
        group = root[split]
        found = dict(group.attrs)
        differs = _differences(found, split_attrs, SPLIT_IDENTITY_KEYS)
        if differs:
            if not self.overwrite:
                raise UserError(
                    f"{self.url}: split {split!r} was captured from other samples or with another layout "
                    f"(differs in: {', '.join(differs)}; e.g. another --max-samples or --block-samples); "
                    "pass --overwrite to replace it"
                )
            stores.drop_consolidated(self.url)
            stores.remove(self.url, split)
            return None
        return group if found.get("initialised") else None

    def _create_group(self, root, split, layout, sizes, static, dynamic, split_attrs) -> Any:
        """Create the split's group, arrays and static data; idempotent, never deletes anything."""
        from zarr.errors import ContainsGroupError

        stores.drop_consolidated(self.url)  # the split changes state: readers must not trust a stale copy
        with _quiet():
            try:
                group = root.create_group(split, attributes={**split_attrs, "complete": False, "initialised": False})
            except ContainsGroupError:
                group = root[split]
        big = {"token": layout.token_chunk * 64, "sample": layout.block_samples * 64}
        for name, (dims, values) in static.items():
            chunks = tuple(min(sizes[d], big.get(d, sizes[d])) or 1 for d in dims)
            array = self._create_array(group, name, dims, values.shape, str(values.dtype), chunks)
            array[...] = values  # identical bytes whoever writes them
        for name, spec in dynamic.items():
            shape = tuple(sizes[d] for d in spec.dims)
            chunks = tuple(self._dynamic_chunk(d, sizes[d], layout) for d in spec.dims)
            self._create_array(group, name, spec.dims, shape, spec.dtype, chunks)
        # block_done chunks are written only when a block is done (a missing chunk reads 0), so that
        # no shard ever writes another shard's progress.
        self._create_array(group, "block_done", ("block",), (layout.n_blocks,), "uint8", (1,))
        group = stores.open_root(self.url, mode="r+")[split]  # fresh attributes: never rewrite stale ones
        group.attrs["initialised"] = True
        return group

    @staticmethod
    def _dynamic_chunk(dim: str, size: int, layout: SplitLayout) -> int:
        if dim == "token":
            return layout.token_chunk
        if dim == "sample":
            return layout.block_samples
        if dim in ("layer", "mlp_layer"):
            return 1
        return size

    @staticmethod
    def _create_array(group, name, dims, shape, dtype, chunks) -> Any:
        """Create an array, or take the existing one when it has the same shape, chunks and dtype."""
        if name in group.array_keys():
            array = group[name]
            if array.shape == tuple(shape) and array.chunks == tuple(chunks) and array.dtype == np.dtype(dtype):
                return writable(array)
            raise UserError(f"{group.store_path}/{name}: exists with another shape or dtype; pass --overwrite")
        from zarr.errors import ContainsArrayError

        with _quiet():
            try:
                return group.create_array(
                    name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims, fill_value=0,
                    compressors=compressors(), config={"write_empty_chunks": True}, overwrite=False,
                )
            except ContainsArrayError:  # another shard created it a moment ago
                return writable(group[name])


def writable(array: Any) -> Any:
    """The array writing every chunk, all-zero ones included (``write_empty_chunks`` is not stored
    with an array: an opened one would otherwise *delete* a chunk it fills with zeros)."""
    return array.with_config({"write_empty_chunks": True})


def zarr_group(url: str, attributes: Mapping[str, Any]) -> Any:
    """Create a cache's root group with its attributes in one write (refused if one exists)."""
    import zarr

    return zarr.create_group(stores.store_for(url), attributes=dict(attributes), zarr_format=3, overwrite=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence zarr's warnings (e.g. consolidated metadata not being in the v3 spec yet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class SplitWriter:
    """Fills the dynamic arrays of one split, block by block, from a background thread."""

    def __init__(self, url: str, split: str, layout: SplitLayout, group: Any, dynamic: Mapping[str, Dynamic]):
        self.url, self.split, self.layout, self.group = url, split, layout, group
        self.dynamic = dict(dynamic)
        self.arrays = {name: writable(group[name]) for name in dynamic}
        self.done_array = writable(group["block_done"])
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._block: int | None = None
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_start = 0
        self._samples: dict[str, list[np.ndarray]] = {}

    # --- what is left ----------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete"))

    def done_blocks(self) -> np.ndarray:
        return np.asarray(self.done_array[...], dtype=bool)

    def pending_blocks(self, shard: int = 1, n_shards: int = 1) -> list[int]:
        """Blocks of this shard not yet recorded as written."""
        done = self.done_blocks()
        return [b for b in self.layout.shard_blocks(shard, n_shards) if not done[b]]

    # --- producer side (capture loop) ---------------------------------------------------------
    def start(self) -> "SplitWriter":
        self._thread = threading.Thread(target=self._run, name=f"cache-writer-{self.split}", daemon=True)
        self._thread.start()
        return self

    def _put(self, item: tuple) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def submit(self, block: int, data: Mapping[str, np.ndarray]) -> None:
        """Queue one batch of ``block``: every dynamic array's values for consecutive samples."""
        self._put(("batch", block, dict(data)))

    def end_block(self, block: int) -> None:
        """Queue the end of ``block``: flush its last chunks, then record it as done."""
        self._put(("end", block, None))

    def drain(self) -> None:
        """Wait until everything queued so far is written."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Finish writing and stop the thread; re-raise any writer error here."""
        if self._thread is not None:
            self._queue.put(("stop", None, None))  # the thread keeps consuming even after an error
            self._thread.join()
            self._thread = None
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # --- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, block, data = self._queue.get()
            try:
                if kind == "stop":
                    return
                if self._error is None:
                    if kind == "batch":
                        self._write_batch(block, data)
                    else:
                        self._finish_block(block)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc
            finally:
                self._queue.task_done()

    def _begin(self, block: int) -> None:
        self._block = block
        self._pending = {name: [] for name, spec in self.dynamic.items() if spec.axis_dim == "token"}
        self._samples = {name: [] for name, spec in self.dynamic.items() if spec.axis_dim == "sample"}
        self._pending_start = self.layout.block_token_range(block)[0]

    def _write_batch(self, block: int, data: Mapping[str, np.ndarray]) -> None:
        if self._block != block:
            self._begin(block)
        for name, values in data.items():
            (self._pending if name in self._pending else self._samples)[name].append(values)
        self._flush_tokens(final=False)

    def _flush_tokens(self, final: bool) -> None:
        """Write every whole chunk buffered so far; at the block's end, its last chunk with slack.

        Views, not copies, wherever possible: the writer thread's time is the capture overhead.
        """
        if not self._pending:
            return
        chunk = self.layout.token_chunk
        block_stop = self.layout.block_token_range(self._block)[1]
        counts = {sum(v.shape[self.dynamic[n].axis] for v in vals) for n, vals in self._pending.items()}
        if len(counts) != 1:
            raise ValueError(f"token arrays of one batch disagree in length: {counts}")
        count = counts.pop()
        if count == 0:  # everything buffered was written in whole chunks already
            if final and self._pending_start != block_stop:
                raise ValueError(f"block {self._block} received fewer tokens than its layout holds")
            return
        if self._pending_start + count > block_stop:
            raise ValueError(f"block {self._block} received more tokens than its layout holds")
        whole = (count // chunk) * chunk
        tail = count - whole if final else 0
        if final and self._pending_start + whole + (chunk if tail else 0) != block_stop:
            raise ValueError(f"block {self._block} received fewer tokens than its layout holds")
        for name, values in self._pending.items():
            axis = self.dynamic[name].axis
            joined = np.concatenate(values, axis=axis) if len(values) > 1 else values[0]
            if whole:
                self._write(name, axis, self._pending_start, _slice(joined, axis, 0, whole))
            if tail:  # the block's last chunk: real tokens, then zeros (slack)
                shape = list(joined.shape)
                shape[axis] = chunk
                padded = np.zeros(shape, dtype=joined.dtype)
                padded[_index(padded.ndim, axis, 0, tail)] = _slice(joined, axis, whole, count)
                self._write(name, axis, self._pending_start + whole, padded)
            rest = count - whole - tail
            self._pending[name] = [_slice(joined, axis, whole, count)] if rest else []
        self._pending_start += whole + (chunk if tail else 0)

    def _write(self, name: str, axis: int, start: int, values: np.ndarray) -> None:
        self.arrays[name][_index(values.ndim, axis, start, start + values.shape[axis])] = values

    def _finish_block(self, block: int) -> None:
        if self._block != block:
            self._begin(block)
        self._flush_tokens(final=True)
        first, stop = self.layout.block_sample_range(block)
        for name, values in self._samples.items():
            axis = self.dynamic[name].axis
            joined = np.concatenate(values, axis=axis)
            if joined.shape[axis] != stop - first:
                raise ValueError(f"{name}: block {block} got {joined.shape[axis]} samples, expected {stop - first}")
            selection = [slice(None)] * joined.ndim
            selection[axis] = slice(first, stop)
            self.arrays[name][tuple(selection)] = joined
        self.done_array[block] = 1
        self._block = None

    # --- completion ----------------------------------------------------------------------------
    def finalize_if_done(self) -> bool:
        """Mark the split complete (and consolidate metadata) once every block is done."""
        with stores.lock(self.url):
            self.group = stores.open_root(self.url, mode="r+")[self.split]  # fresh: other shards
            if self.complete:
                return True
            if not self.done_blocks().all():
                return False
            self.group.attrs["complete"] = True
            stores.consolidate(self.url)
        return True
