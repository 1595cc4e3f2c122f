"""Opening a cache location (local path, ``file://`` or any fsspec URL) and guarding it.

Local paths go through zarr's ``LocalStore`` (atomic chunk writes); other URLs through zarr's
fsspec store, so ``memory://``, ``s3://``, ``gs://``... work unchanged (credentials and endpoints
come from each filesystem's own environment, e.g. ``AWS_*`` for s3). ``http(s)://`` caches are
read-only: any static file server can share a finished cache.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from unlearn_lens.core.errors import UserError


def local_path(url: str) -> Path | None:
    """The filesystem path of a local cache location, None for a remote URL."""
    url = str(url)
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        return None
    return Path(url).expanduser()


#: URL schemes that can only be read (a static file server); writing to them is refused.
READ_ONLY_SCHEMES = ("http://", "https://")


def is_read_only(url: str) -> bool:
    """True for locations that cannot be written (``http(s)://``)."""
    return str(url).lower().startswith(READ_ONLY_SCHEMES)


def refuse_read_only(url: str) -> None:
    """One-line ``UserError`` when ``url`` cannot be written."""
    if is_read_only(url):
        raise UserError(f"{url}: http(s) caches are read-only; capture to a path or an object store "
                        "(s3://...) and serve the finished cache")


def store_for(url: str, read_only: bool = False) -> Any:
    """A zarr store for a path or URL (always read-only for ``http(s)://``)."""
    import zarr

    path = local_path(url)
    if path is not None:
        return zarr.storage.LocalStore(path, read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(str(url), read_only=read_only or is_read_only(url))
    except (ImportError, ValueError) as exc:
        raise UserError(f"{url}: cannot open this URL ({exc})") from None


def metadata_once(store: Any) -> Any:
    """``store`` wrapped so that each ``zarr.json`` document is fetched at most once (reading only):
    with consolidated metadata, opening a split then costs one metadata request on HTTP or S3."""
    from cache_store.metadata_store import MetadataOnce

    return MetadataOnce(store)


def exists(url: str) -> bool:
    """True when a Zarr group lives at ``url``."""
    path = local_path(url)
    if path is not None:
        return (path / "zarr.json").is_file()
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    return fs.exists(f"{root.rstrip('/')}/zarr.json")


def remove(url: str, member: str | None = None) -> None:
    """Delete a whole cache, or one member group of it."""
    path = local_path(url)
    if path is not None:
        import shutil

        shutil.rmtree(path / member if member else path, ignore_errors=True)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    target = f"{root.rstrip('/')}/{member}" if member else root
    if fs.exists(target):
        fs.rm(target, recursive=True)


def open_root(url: str, mode: str = "r", consolidated: bool | None = False, store: Any = None) -> Any:
    """The cache's root ``zarr.Group`` (through ``store`` when given); a clear error when there is none."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return zarr.open_group(store if store is not None else store_for(url, read_only=mode == "r"),
                                   mode=mode, zarr_format=3, use_consolidated=consolidated)
        except (FileNotFoundError, KeyError) as exc:
            if mode == "r" and not exists(url):
                raise UserError(f"{url}: no activation cache here (create one with `unlearn-lens capture`)") from None
            raise UserError(f"{url}: not a readable activation cache ({exc})") from None


def consolidate(url: str) -> None:
    """Write consolidated metadata so that opening the cache reads one document."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store_for(url))


def drop_consolidated(url: str) -> None:
    """Remove consolidated metadata before a split changes state (group created, reset), so that
    what readers take from it is never stale. Rewrites the root document without it."""
    root = open_root(url, mode="r+", consolidated=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.update_attributes({})


@contextlib.contextmanager
def lock(url: str) -> Iterator[None]:
    """Exclusive lock on a local cache (a ``<cache>.lock`` file beside it; ``flock``).

    Serialises store creation and finalisation between concurrent ``--shard`` processes. Remote
    URLs are not locked: there every write is idempotent or owned by one shard (SCHEMA.md, sharing).
    """
    path = local_path(url)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
