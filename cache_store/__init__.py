"""Zarr activation cache: written once by ``unlearn-lens capture``, read lazily by the analyses.

Torch-free by design (numpy, zarr, xarray, dask only): analyses run where no model can. The
xarray contract is in ``SCHEMA.md``; the on-disk layout is this package's business. Importing
the package registers the ``ds.ulens`` Dataset accessor (``cache_store.accessor``).
"""

from cache_store import accessor  # noqa: F401 (registers ds.ulens on xarray Datasets)
from cache_store.layout import SplitLayout, choose_token_chunk
from cache_store.reader import is_complete, list_splits, open_cache, open_caches
from cache_store.writer import CacheWriter, Dynamic, SplitWriter

__all__ = ["CacheWriter", "Dynamic", "SplitLayout", "SplitWriter", "choose_token_chunk", "is_complete",
           "list_splits", "open_cache", "open_caches"]
