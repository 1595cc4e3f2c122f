"""Can this process write the cache location? Asked before a model loads, answered in one line.

A capture loads the model (minutes for 6.9B) before it writes anything; an object store without
credentials, a bucket that does not exist, an endpoint that refuses the connection or a read-only
folder would only show then. ``check_writable`` writes and removes one small probe object (a file
for a local path) where the cache goes, and turns any failure into a ``UserError`` naming the
cause and the fix (``unlearn_lens.core.environment``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cache_store import store as stores
from unlearn_lens.core.environment import explain
from unlearn_lens.core.errors import UserError

#: the probe's name: beside the cache's own files, removed at once
PROBE_PREFIX = ".unlearn-lens-write-check-"


def check_writable(url: str) -> None:
    """Refuse (``UserError``) when the cache location ``url`` cannot take a cache: a read-only URL, a
    folder that holds something other than a cache (``store.refuse_foreign_folder``: never written
    into, so it is checked before the probe), or a location this process cannot write. Leaves
    nothing behind."""
    stores.refuse_read_only(url)
    path = stores.local_path(url)
    try:
        stores.refuse_foreign_folder(url)
        if path is not None:
            _probe_local(path)
        else:
            _probe_remote(str(url))
    except UserError:
        raise
    except Exception as exc:
        message = explain(exc, str(url))
        if message is None:
            raise
        raise UserError(message) from None


def _probe_local(path: Path) -> None:
    """Create the cache's parent folders and write one empty file in the folder that will hold the cache."""
    folder = path if path.is_dir() else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    probe.unlink()


def _probe_remote(url: str) -> None:
    """Put and delete one small object under the cache's key prefix (needs list-free write access only)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    probe = f"{root.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    fs.pipe_file(probe, b"unlearn-lens write check")
    fs.rm_file(probe)
