"""What an output was made from: the identity of each input, recorded in its completion marker.

A finished folder counts as finished for a run only when its marker's ``inputs`` equal the
inputs of that run (``outputs.is_complete(folder, inputs)``), so a rerun with other data, another
model or a retrained model recomputes it instead of keeping, or mixing in, results made from
something else. The identities are cheap enough to compute at every run:

- data: the SHA-256 of each data file's content (never the manifest's ``hash``, a record that goes
  stale when a file is edited by hand);
- a model: for a local directory or file, each file's name, size and modification time (reading
  14 GB to hash 6.9B weights at every run would cost more than most steps; a model rewritten in
  place changes its times), for a hub id the id and revision;
- a cache: the identity its capture recorded (``cache_store.identity``).

Standard library only, like the rest of the core.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

#: the data files every step reads (``datasets create`` writes them; ``unlearn_lens.data`` reads them)
DATA_FILES = {"forget": "forget.txt", "retain": "retain.txt", "wmdp": "wmdp_mcq.jsonl"}
#: settings fields that change how a step runs, never what it computes (left out of its identity)
VOLATILE_FIELDS = frozenset({"overwrite", "force", "progress", "workers", "scheduler", "processes", "outdir"})


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(data_dir: str | Path | None) -> dict[str, str] | None:
    """``{file name: SHA-256 of its content}`` of the data files present in ``data_dir``."""
    if data_dir is None:
        return None
    folder = Path(data_dir)
    return {name: file_sha256(folder / name) for name in sorted(DATA_FILES.values()) if (folder / name).is_file()}


def model_identity(spec: str, revision: str | None = None) -> dict[str, Any]:
    """A local model's files (name, size, modification time in ns), or a hub id with its revision."""
    path = Path(str(spec)).expanduser()
    if not path.exists():
        return {"hub": str(spec), "revision": revision}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"files": {str(p.relative_to(path) if p != path else p.name): [p.stat().st_size, p.stat().st_mtime_ns]
                      for p in files}}


def settings_identity(settings: Any) -> dict[str, Any]:
    """A settings dataclass as plain JSON values, without the fields (at any depth) that do not change results."""
    values = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return _without_volatile(plain(values))


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_volatile(item) for key, item in value.items() if key not in VOLATILE_FIELDS}
    if isinstance(value, list):
        return [_without_volatile(item) for item in value]
    return value


def plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings), for comparing records."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def inputs_record(*, models: Iterable[tuple[str, str, str | None]] = (), data: str | Path | None = None,
                  caches: dict[str, Any] | None = None, settings: Any = None) -> dict[str, Any]:
    """The ``inputs`` of a completion marker: models ``(role, spec, revision)``, data, caches, settings."""
    record: dict[str, Any] = {}
    for role, spec, revision in models:
        record.setdefault("models", {})[role] = model_identity(spec, revision)
    if data is not None:
        record["data"] = data_identity(data)
    if caches:
        record["caches"] = caches
    if settings is not None:
        record["settings"] = settings_identity(settings)
    return plain(record)
