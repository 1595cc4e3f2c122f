"""Atomic file writes: a temporary sibling, then one rename, so no half-written file looks finished.

Every writer of the project goes through here (``analyses/io.py`` builds its CSV, JSON and
figure helpers on it): ``atomic_write_text`` for text, ``atomic_path`` for a library that
writes a file by name itself (safetensors, ``np.savez``, matplotlib).
"""

from __future__ import annotations

import os
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
