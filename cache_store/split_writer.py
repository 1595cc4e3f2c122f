"""Filling one split: the capture loop hands over batches, writer threads encode and store chunks.

The capture loop (``unlearn_lens.capture``) gives ``SplitWriter.submit`` each batch's numpy arrays
and goes on with the next forward pass. A dispatcher thread cuts the token-axis arrays into whole
chunks (views of the batch where a chunk lies inside one batch, a copy only where it straddles
two) and hands each chunk to a pool of ``threads`` writer threads, which encode it
(``chunks.ChunkCodec``: zstd-1 and crc32c release the GIL) and store it. Every chunk is written
once, and never outside the block that owns it (see ``layout``); the last chunk written of a
block records it in ``block_done``, so a block is marked done only after all its chunks are
stored, whichever thread stored them. Chunks hold the same bytes whatever the thread count.

The queue is bounded (``QUEUE_BATCHES``) and so are the chunks in flight (``CHUNKS_PER_THREAD``
per thread): memory stays at a few batches, and the capture loop waits only when every writer
thread is busy. On a CPU node the writer threads may run at a lower priority (``background``):
they use the cores the forward leaves idle and never slow the forward itself.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from cache_store import store as stores
from cache_store.chunks import ChunkCodec, ChunkSink
from cache_store.layout import SplitLayout

#: Batches the capture loop may queue ahead of the dispatcher.
QUEUE_BATCHES = 4
#: Chunks in flight per writer thread (queued in the pool or being encoded).
CHUNKS_PER_THREAD = 4
#: How much lower (nice) a background writer thread runs than the forward (Linux: per thread).
BACKGROUND_NICENESS = 10


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


class _Pieces:
    """Batches of one token-axis array not yet written, taken from the front in whole chunks."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.parts: list[np.ndarray] = []
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        if values.shape[self.axis]:
            self.parts.append(values)
            self.count += values.shape[self.axis]

    def take(self, n: int) -> np.ndarray:
        """The first ``n`` tokens: a view when they lie in one batch, else one copy of them."""
        taken: list[np.ndarray] = []
        need = n
        while need:
            part = self.parts[0]
            size = part.shape[self.axis]
            if size <= need:
                taken.append(part)
                self.parts.pop(0)
                need -= size
            else:
                taken.append(_slice(part, self.axis, 0, need))
                self.parts[0] = _slice(part, self.axis, need, size)
                need = 0
        self.count -= n
        return taken[0] if len(taken) == 1 else np.concatenate(taken, axis=self.axis)


class _Block:
    """Chunks of one block still being written; the last one to finish records the block as done.

    Starts with one count held by the dispatcher, released once every chunk of the block has been
    handed out, so the block cannot be recorded before its last chunk is even submitted."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.pending = 1
        self.failed = False
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.pending += 1

    def finish(self, ok: bool) -> bool:
        """Count one chunk (or the dispatcher's hold) as done; True for the very last of a sound block."""
        with self.lock:
            self.failed = self.failed or not ok
            self.pending -= 1
            return self.pending == 0 and not self.failed


def writable(array: Any) -> Any:
    """The array writing every chunk, all-zero ones included (``write_empty_chunks`` is not stored
    with an array: an opened one would otherwise *delete* a chunk it fills with zeros)."""
    return array.with_config({"write_empty_chunks": True})


def _background() -> None:
    """Lower this writer thread's priority (Linux: nice is per thread), where the platform allows."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICENESS)
    except (AttributeError, OSError):
        pass


class SplitWriter:
    """Fills the dynamic arrays of one split, block by block, from a dispatcher and writer threads."""

    def __init__(self, url: str, split: str, layout: SplitLayout, group: Any, dynamic: Mapping[str, Dynamic],
                 threads: int = 1, background: bool = False):
        if threads < 1:
            raise ValueError("a split writer needs at least one thread")
        self.url, self.split, self.layout, self.group = url, split, layout, group
        self.dynamic = dict(dynamic)
        self.threads, self.background = threads, background
        self.arrays = {name: writable(group[name]) for name in dynamic}
        self.codecs = {name: ChunkCodec(group[name]) for name in [*dynamic, "block_done"]}
        self.done_array = writable(group["block_done"])
        self.sink = ChunkSink(url)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(CHUNKS_PER_THREAD * threads)
        self._error: BaseException | None = None
        self._block: int | None = None
        self._tracker: _Block | None = None
        self._pending: dict[str, _Pieces] = {}
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
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"cache-writer-{self.split}",
                                        initializer=_background if self.background else None)
        self._thread = threading.Thread(target=self._run, name=f"cache-dispatch-{self.split}", daemon=True)
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
        """Queue the end of ``block``: flush its last chunks; the last one written records it as done."""
        self._put(("end", block, None))

    def drain(self) -> None:
        """Wait until everything queued so far is written (block records included)."""
        done = threading.Event()
        self._put(("sync", None, done))
        done.wait()
        self._raise_if_failed()

    def close(self) -> None:
        """Finish writing and stop the threads; re-raise any writer error here."""
        if self._thread is not None:
            self._queue.put(("stop", None, None))  # the dispatcher keeps consuming even after an error
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # --- dispatcher thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, block, data = self._queue.get()
            try:
                if kind == "stop":
                    return
                if kind == "sync":
                    self._wait_idle()
                    data.set()
                elif self._error is None:
                    if kind == "batch":
                        self._write_batch(block, data)
                    else:
                        self._finish_block(block)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = self._error or exc
            finally:
                self._queue.task_done()

    def _wait_idle(self) -> None:
        """Block until no chunk is in flight (every slot back)."""
        slots = CHUNKS_PER_THREAD * self.threads
        for _ in range(slots):
            self._slots.acquire()
        for _ in range(slots):
            self._slots.release()

    def _chunk(self, name: str, coords: tuple[int, ...], values: np.ndarray, tracker: _Block | None) -> None:
        """Hand one chunk to the writer threads (waits while every slot is in flight)."""
        self._slots.acquire()
        if tracker is not None:
            tracker.add()
        try:
            self._pool.submit(self._store, name, coords, values, tracker)
        except BaseException:
            self._slots.release()
            raise

    def _store(self, name: str, coords: tuple[int, ...], values: np.ndarray, tracker: _Block | None) -> None:
        """Writer thread: encode and store one chunk; the block's last chunk records the block."""
        ok = False
        try:
            if self._error is None:
                self._put_chunk(name, coords, values)
                ok = True
        except BaseException as exc:  # noqa: BLE001 - handed to the producer
            self._error = self._error or exc
        finally:
            try:
                if tracker is not None and tracker.finish(ok):
                    self._record(tracker.block)
            except BaseException as exc:  # noqa: BLE001
                self._error = self._error or exc
            self._slots.release()

    def _put_chunk(self, name: str, coords: tuple[int, ...], values: np.ndarray) -> None:
        codec = self.codecs[name]
        if not codec.supported:  # a codec this module does not encode: let zarr write it
            array = self.arrays[name] if name in self.arrays else self.done_array
            selection = tuple(slice(c * n, c * n + s) for c, n, s in zip(coords, codec.chunk_shape, values.shape))
            array[selection] = values
            return
        self.sink.put(f"{self.split}/{name}/{codec.key(coords)}", codec.encode(values))

    def _record(self, block: int) -> None:
        """Mark a block written (its ``block_done`` chunk exists only from now on)."""
        self._put_chunk("block_done", (block,), np.ones(1, dtype=np.uint8))

    def _begin(self, block: int) -> None:
        self._block = block
        self._tracker = _Block(block)
        self._pending = {name: _Pieces(spec.axis) for name, spec in self.dynamic.items() if spec.axis_dim == "token"}
        self._samples = {name: [] for name, spec in self.dynamic.items() if spec.axis_dim == "sample"}
        self._pending_start = self.layout.block_token_range(block)[0]

    def _write_batch(self, block: int, data: Mapping[str, np.ndarray]) -> None:
        if self._block != block:
            self._begin(block)
        for name, values in data.items():
            if name in self._pending:
                self._pending[name].add(values)
            else:
                self._samples[name].append(values)
        self._flush_tokens(final=False)

    def _flush_tokens(self, final: bool) -> None:
        """Hand out every whole chunk buffered so far; at the block's end, its last chunk with slack."""
        if not self._pending:
            return
        chunk = self.layout.token_chunk
        block_stop = self.layout.block_token_range(self._block)[1]
        counts = {pieces.count for pieces in self._pending.values()}
        if len(counts) != 1:
            raise ValueError(f"token arrays of one batch disagree in length: {counts}")
        count = counts.pop()
        if self._pending_start + count > block_stop:
            raise ValueError(f"block {self._block} received more tokens than its layout holds")
        whole = count // chunk
        tail = count - whole * chunk if final else 0
        if final and self._pending_start + whole * chunk + (chunk if tail else 0) != block_stop:
            raise ValueError(f"block {self._block} received fewer tokens than its layout holds")
        for index in range(whole + (1 if tail else 0)):
            position = (self._pending_start + index * chunk) // chunk
            for name, pieces in self._pending.items():
                axis = pieces.axis
                values = pieces.take(min(chunk, pieces.count))
                if values.shape[axis] < chunk:  # the block's last chunk: real tokens, then zeros (slack)
                    shape = list(values.shape)
                    shape[axis] = chunk
                    padded = np.zeros(shape, dtype=values.dtype)
                    padded[_index(padded.ndim, axis, 0, values.shape[axis])] = values
                    values = padded
                self._chunks_of(name, axis, position, values)
        self._pending_start += (whole + (1 if tail else 0)) * chunk

    def _chunks_of(self, name: str, axis: int, position: int, values: np.ndarray) -> None:
        """One chunk per entry of the leading (layer) axes of a chunk-long slab along ``axis``."""
        leading = values.shape[:axis]
        for index in np.ndindex(*leading):
            coords = (*index, position) + (0,) * (values.ndim - axis - 1)
            self._chunk(name, coords, values[index][None] if leading else values, self._tracker)

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
            self._chunks_of(name, axis, block, joined)
        tracker, self._tracker, self._block = self._tracker, None, None
        if tracker.finish(True):  # every chunk already written: record the block here
            self._record(block)

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
