"""A read-only store wrapper that fetches each ``zarr.json`` document once (see ``store.metadata_once``)."""

from __future__ import annotations

from typing import Any

from zarr.storage import WrapperStore


class MetadataOnce(WrapperStore):
    """Caches whole-document reads of ``zarr.json`` keys; every other read goes through.

    Opening a split reads the root document (consolidated metadata: every group and array) several
    times through zarr and xarray; over HTTP or S3 each read would be a request.
    """

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self._documents: dict[str, Any] = {}

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is not None or not key.endswith("zarr.json"):
            return await self._store.get(key, prototype, byte_range)
        if key not in self._documents:
            self._documents[key] = await self._store.get(key, prototype)
        return self._documents[key]

    def __getstate__(self) -> dict:  # a dask worker process starts with an empty cache
        return {"_store": self._store, "_documents": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
