"""Opening a cache location (local path, ``file://`` or any fsspec URL) and guarding it.

Local paths go through zarr's ``LocalStore`` (atomic chunk writes); other URLs through zarr's
fsspec store, so ``memory://``, ``s3://``, ``gs://``... work unchanged.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from unlearn_lens.errors import UserError


def local_path(url: str) -> Path | None:
    """The filesystem path of a local cache location, None for a remote URL."""
    url = str(url)
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        return None
    return Path(url).expanduser()


def store_for(url: str, read_only: bool = False) -> Any:
    """A zarr store for a path or URL."""
    import zarr

    path = local_path(url)
    if path is not None:
        return zarr.storage.LocalStore(path, read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(str(url), read_only=read_only)
    except (ImportError, ValueError) as exc:
        raise UserError(f"{url}: cannot open this URL ({exc})") from None


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


def open_root(url: str, mode: str = "r", consolidated: bool | None = False) -> Any:
    """The cache's root ``zarr.Group``; a clear error when there is none."""
    import zarr

    if mode == "r" and not exists(url):
        raise UserError(f"{url}: no activation cache here (create one with `unlearn-lens capture`)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return zarr.open_group(store_for(url, read_only=mode == "r"), mode=mode, zarr_format=3,
                                   use_consolidated=consolidated)
        except (FileNotFoundError, KeyError) as exc:
            raise UserError(f"{url}: not a readable activation cache ({exc})") from None


def consolidate(url: str) -> None:
    """Write consolidated metadata so that opening the cache reads one document."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store_for(url))


@contextlib.contextmanager
def lock(url: str) -> Iterator[None]:
    """Exclusive lock on a local cache (a ``<cache>.lock`` file beside it; ``flock``).

    Serialises store creation and finalisation between concurrent ``--shard`` processes. Remote
    URLs are not locked: create the store with one process before starting shards there.
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
