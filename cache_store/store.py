"""Opening a cache location (local path, ``file://`` or any fsspec URL) and guarding it.

Local paths go through zarr's ``LocalStore`` (atomic chunk writes); other URLs through zarr's
fsspec store, so ``memory://``, ``s3://``, ``gs://``... work unchanged (credentials and endpoints
come from each filesystem's own environment, e.g. ``AWS_*`` for s3). ``http(s)://`` caches are
read-only: any static file server can share a finished cache.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

from unlearn_lens.core.environment import explain
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


def metadata_path(url: str) -> str:
    """Where a cache's root metadata document lives (``<cache>/zarr.json``)."""
    return f"{str(url).rstrip('/')}/zarr.json"


def metadata_once(store: Any, url: str = "") -> Any:
    """``store`` wrapped for reading: each ``zarr.json`` document is fetched at most once (with
    consolidated metadata, opening a split costs one metadata request on HTTP or S3), and a missing
    chunk raises ``MissingChunkError`` naming it (never read as zeros)."""
    from cache_store.metadata_store import MetadataOnce

    return MetadataOnce(store, url)


def exists(url: str) -> bool:
    """True when a Zarr group lives at ``url``.

    A remote location that cannot be asked (no credentials, a refused connection) is a one-line
    ``UserError`` naming the cause, never "no cache here" (fsspec's ``exists`` answers False to both).
    """
    path = local_path(url)
    if path is not None:
        return (path / "zarr.json").is_file()
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(url))
        fs.info(f"{root.rstrip('/')}/zarr.json")
    except FileNotFoundError as exc:
        if explain(exc) is None:
            return False
        raise UserError(explain(exc, str(url))) from None
    except Exception as exc:
        message = explain(exc, str(url))
        if message is None:
            raise
        raise UserError(message) from None
    return True


def remove(url: str, member: str | None = None) -> None:
    """Delete one member group of a cache (a split replaced by ``--overwrite``)."""
    if member is None:
        raise ValueError("remove() deletes a member of a cache; remove_cache() a whole cache")
    path = local_path(url)
    if path is not None:
        import shutil

        shutil.rmtree(path / member, ignore_errors=True)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    target = f"{root.rstrip('/')}/{member}"
    if fs.exists(target):
        fs.rm(target, recursive=True)


def _entries(url: str) -> list[str] | None:
    """Names directly inside the location (None when nothing is there)."""
    path = local_path(url)
    if path is not None:
        if not path.exists():
            return None
        if not path.is_dir():
            return [path.name]
        return sorted(os.listdir(path))
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # another shard may have created the cache since this process last listed it
    try:
        names = [name.rstrip("/") for name in fs.ls(root, detail=False)]
        return sorted(name.rsplit("/", 1)[-1] for name in names if name != root)
    except FileNotFoundError:
        return None


def refuse_foreign_folder(url: str) -> None:
    """One-line ``UserError`` when ``url`` holds something that is not an activation cache.

    A capture writes only into a new or empty folder or into a cache; nothing else there is ever
    written into or deleted (``--overwrite`` replaces a cache, never another folder).
    """
    entries = _entries(url)
    if not entries or "zarr.json" in entries:
        return
    path = local_path(url)
    if path is not None and not path.is_dir():
        raise UserError(f"{url} is a file, not a cache folder; choose another --out")
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise UserError(f"{url} is a folder that holds no activation cache (it has: {shown}); capture into a new or "
                    "empty folder (nothing there was changed; --overwrite replaces only a cache)")


def remove_cache(url: str) -> None:
    """Delete a cache's own members (its split groups and root document), nothing else in its folder.

    The folder itself goes only when nothing else is left in it.
    """
    root = open_root(url, mode="r", consolidated=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a user's file beside the groups is not a zarr member: left alone
        members = sorted(root.group_keys()) + sorted(root.array_keys())
    for member in members:
        remove(url, member)
    path = local_path(url)
    if path is not None:
        (path / "zarr.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty
        return
    import fsspec

    fs, base = fsspec.core.url_to_fs(str(url))
    target = f"{base.rstrip('/')}/zarr.json"
    if fs.exists(target):
        fs.rm(target)


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
        except ValueError as exc:  # zarr.json is not JSON, or not zarr metadata (a truncated copy, a foreign file)
            raise UserError(f"{metadata_path(url)} is unreadable ({type(exc).__name__}: {str(exc)[:120]}); the "
                            "cache's metadata is damaged: copy the cache again, or recapture it with "
                            "`unlearn-lens capture ... --overwrite`") from None


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


#: the temporary file zarr's LocalStore writes a key into before renaming it (``<key>.<uuid4 hex>.partial``)
_INTERRUPTED_WRITE = re.compile(r"^.*\.[0-9a-f]{32}\.partial$")


def settle_finished(url: str) -> list[str]:
    """Once every split of the cache is complete, leave it as an uninterrupted capture leaves it.

    A capture killed after a split was marked complete but before the consolidated metadata was
    rewritten leaves a root document that is missing or stale (it may still call that split
    incomplete, and readers trust it); the resumed capture finds every split "already complete".
    So this rewrites the consolidated metadata from the split groups themselves (identical bytes when
    nothing was interrupted). And zarr's ``LocalStore`` writes each key to ``<key>.<uuid>.partial``
    before renaming it: a process killed in between leaves that file, debris of this tool's own write
    (the key itself was rewritten on resume), removed here. Both under the cache's lock, once no
    process writes into the cache any more. Returns the temporary files removed (relative paths).
    """
    with lock(url):
        root = open_root(url, consolidated=False)  # the groups' own state, not a possibly stale summary
        splits = list(root.group_keys())
        if not splits or not all(bool(root[split].attrs.get("complete")) for split in splits):
            return []
        consolidate(url)
        path = local_path(url)
        leftovers = sorted(path.rglob("*.partial")) if path is not None else []
        removed = [p for p in leftovers if p.is_file() and _INTERRUPTED_WRITE.match(p.name)]
        for leftover in removed:
            leftover.unlink()
    return [str(p.relative_to(path)) for p in removed]


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
