"""Atomic file writes: a temporary sibling, then one rename, so no half-written file looks finished.

Every writer of the project goes through here (``analyses/io.py`` builds its CSV, JSON and
figure helpers on it): ``atomic_write_text`` for text, ``atomic_path`` for a library that
writes a file by name itself (safetensors, ``np.savez``, matplotlib), ``atomic_dir`` for a whole
directory (a saved model).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it replaces ``path``, on failure it is removed.

    ``suffix`` is the temporary name's ending, for writers that insist on one (``np.savez``: ``.npz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically (newlines written as given)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty sibling ``<name>.partial`` to fill; on success it replaces the directory ``path``.

    An interrupted write leaves only the ``.partial`` sibling (cleared by the next attempt), never
    a directory at ``path`` that looks finished.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
