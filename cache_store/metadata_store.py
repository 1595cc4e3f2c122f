"""The store readers open a cache through (see ``store.reading_store``): each ``zarr.json`` fetched
once, and a missing chunk an error instead of zeros."""

from __future__ import annotations

from typing import Any

from zarr.storage import WrapperStore

from unlearn_lens.core.errors import UserError

#: Arrays whose chunks exist only where their block is done (a missing one is not damage).
PROGRESS_ARRAYS = ("block_done",)


class MissingChunkError(UserError):
    """A chunk that every finished cache holds is absent: damage, named in one line."""


def missing_chunk(url: str, key: str) -> MissingChunkError:
    return MissingChunkError(
        f"{url}: chunk {key} is missing (the cache is damaged: a partial copy, a sync tool or an object-store "
        f"rule removed it); run `unlearn-lens cache verify {url} --reset-damaged`, then rerun its capture command")


def is_chunk_key(key: str) -> bool:
    """True for a chunk of a cache array that must exist (not metadata, not a progress record)."""
    parts = key.split("/")
    return not key.endswith("zarr.json") and "c" in parts and not any(name in parts for name in PROGRESS_ARRAYS)


class MetadataOnce(WrapperStore):
    """Caches whole-document reads of ``zarr.json`` keys and refuses missing chunks.

    Opening a split reads the root document (consolidated metadata: every group and array) several
    times through zarr and xarray; over HTTP or S3 each read would be a request. A cache writes
    every chunk (all-zero ones included), so a chunk key that is absent is damage: zarr would read
    it as the fill value (zeros); here it raises ``MissingChunkError`` naming the chunk instead, at
    no extra request.
    """

    def __init__(self, store: Any, url: str = "") -> None:
        super().__init__(store)
        self._url = url
        self._documents: dict[str, Any] = {}

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is not None or not key.endswith("zarr.json"):
            found = await self._store.get(key, prototype, byte_range)
            if found is None and is_chunk_key(key):
                raise missing_chunk(self._url, key)
            return found
        if key not in self._documents:
            self._documents[key] = await self._store.get(key, prototype)
        return self._documents[key]

    def __getstate__(self) -> dict:  # a dask worker process starts with an empty cache
        return {"_store": self._store, "_url": self._url, "_documents": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
