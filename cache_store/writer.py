"""Creating or resuming a cache: its root, each split's group, arrays and static data.

``CacheWriter`` checks what is at ``--out`` (a cache of the same provenance is resumed, another
one is replaced only with ``--overwrite``, a folder that holds no cache is never touched), then
``open_split`` creates or finds each split's group and returns a ``split_writer.SplitWriter``
that fills its dynamic arrays block by block. A cache is marked ``complete`` only when every
block is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

from cache_store import store as stores
from cache_store.layout import SplitLayout
from cache_store.split_writer import Dynamic, SplitWriter, writable
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.settings import CACHE_CODECS

__all__ = ["CacheWriter", "Dynamic", "SplitWriter", "compressors", "content_fingerprint", "writable"]

#: 2: a crc32c checksum after every chunk's zstd bytes; block_done chunks written only when done.
#: 3: a split may hold a selection (``--layers``, ``--token-sample``, ``--variables``; its
#: ``selection`` attribute), and arrays may be stored without zstd (``--codec none``).
FORMAT_VERSION = 3

#: Root attributes that identify what a cache holds; any difference means another capture.
IDENTITY_KEYS = ("family", "num_layers", "hidden_size", "weights_fingerprint", "tokenizer_fingerprint",
                 "data_manifest_hash", "max_length", "dtype", "model_dtype")
#: Split attributes that identify a split's content, layout and what was kept of it.
SPLIT_IDENTITY_KEYS = ("layout_fingerprint", "content_fingerprint", "selection")


def compressors(codec: str = CACHE_CODECS[0]) -> list:
    """``zstd1``: zstd level 1, then a crc32c checksum of the compressed bytes (4 bytes per chunk);
    ``none``: the checksum alone.

    zstd-1 was chosen by measurement on SmolLM2 float16 activations (benchmarks/RESULTS.md): it
    saves about 9 % and costs writer CPU, which ``none`` spares where the disk is not the bound.
    float16 barely compresses, so a flipped byte would decode into a wrong value: the checksum makes
    any damaged chunk fail to decode instead (``cache verify`` names it).
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    if codec not in CACHE_CODECS:
        raise UserError(f"--codec {codec!r}: choose one of {', '.join(CACHE_CODECS)}")
    return [ZstdCodec(level=1), Crc32cCodec()] if codec == "zstd1" else [Crc32cCodec()]


def content_fingerprint(token_ids: np.ndarray) -> str:
    """sha256 prefix of the concatenated token ids of a split."""
    return hashlib.sha256(np.ascontiguousarray(token_ids, dtype="<i4").tobytes()).hexdigest()[:16]


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if found.get(key) != wanted.get(key)]


class CacheWriter:
    """One model's cache at ``url``: created, or checked against ``provenance`` and resumed."""

    def __init__(self, url: str, provenance: Mapping[str, Any], *, overwrite: bool = False,
                 codec: str = CACHE_CODECS[0]):
        stores.refuse_read_only(url)
        self.url = str(url)
        self.provenance = dict(provenance)
        self.overwrite = overwrite
        self.codec = codec
        compressors(codec)  # an unknown codec is refused before anything is written

    # --- creation / resumption -----------------------------------------------------------
    # Local caches serialise creation with a lock. Remote ones (s3://...) have none, so every
    # creation step is idempotent and deletes nothing: concurrent shards write identical metadata
    # and static arrays, and each shard then writes only its own blocks' chunks (SCHEMA.md).
    def _root(self) -> Any:
        stores.refuse_foreign_folder(self.url)
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
            stores.remove_cache(self.url)
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
        threads: int = 1,
        background: bool = False,
    ) -> SplitWriter:
        """Create (or find, with identical content and layout) the group of one split.

        ``static`` arrays are known before any forward pass (token ids, offsets, answers...) and
        written here; ``dynamic`` arrays are filled through the returned writer, by ``threads``
        writer threads (``background``: at a lower priority than the capture loop).
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
        return SplitWriter(self.url, split, layout, group, dynamic, threads=threads, background=background)

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
                    f"(differs in: {', '.join(differs)}; e.g. another --max-samples, --block-samples, --layers or "
                    "--token-sample); "
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
            array = self._create_array(group, name, dims, values.shape, str(values.dtype), chunks, self.codec)
            array[...] = values  # identical bytes whoever writes them
        for name, spec in dynamic.items():
            shape = tuple(sizes[d] for d in spec.dims)
            chunks = tuple(self._dynamic_chunk(d, sizes[d], layout) for d in spec.dims)
            self._create_array(group, name, spec.dims, shape, spec.dtype, chunks, self.codec)
        # block_done chunks are written only when a block is done (a missing chunk reads 0), so that
        # no shard ever writes another shard's progress.
        self._create_array(group, "block_done", ("block",), (layout.n_blocks,), "uint8", (1,), self.codec)
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
    def _create_array(group, name, dims, shape, dtype, chunks, codec) -> Any:
        """Create an array, or take the existing one when it has the same shape, chunks and dtype
        (a resumed capture keeps the codec its arrays were created with)."""
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
                    compressors=compressors(codec), config={"write_empty_chunks": True}, overwrite=False,
                )
            except ContainsArrayError:  # another shard created it a moment ago
                return writable(group[name])


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
