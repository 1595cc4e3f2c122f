"""The evaluation memo: each model evaluation's metrics stored once under ``OUT/.evaluations/``.

`relearn` and `attack` evaluate the same models on the same data again and again: the base model
unattacked (in every model's `relearn` and `attack`), the modified model unattacked (`relearn`'s
step 0 and the attack's reference), and the base under an attack (the control rows of
quantization and of both relearning controls, identical for every modified model). Each result
is stored as ``OUT/.evaluations/<key>.json``, ``key`` a SHA-256 of everything it depends on:

* the model: spec, revision and, for a local checkpoint, every file's name, size and mtime (a
  model re-trained at the same path misses); a hub id is keyed by spec and revision only;
* what was done to it: attack, setting, options, seed (None for the unattacked model);
* the evaluation data: the texts and questions (id, question, choices, answer) measured;
* the evaluation settings: max_length, batch size, dtype (``auto`` resolved), device.

Writes are atomic; a damaged file is ignored and recomputed; ``force`` recomputes and rewrites.
Standard library only (torch only to resolve ``auto`` device / dtype).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_write_text

#: Bump when ``evaluation.evaluate`` changes what it computes: every stored result then misses.
MEMO_VERSION = 4  # 2: results carry their per-item values (analyses.uncertainty.PER_ITEM); 3: retain-set questions;
# 4: a testbed's forget_value_nll


def checkpoint_fingerprint(spec: str) -> list | None:
    """``[[relative name, size, mtime_ns], ...]`` of a local checkpoint (a directory's files, or one
    file); None for a hub id. Cheap: no file is read."""
    path = Path(spec)
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    if path.is_dir():
        files = [(f, f.stat()) for f in sorted(path.rglob("*")) if f.is_file()]
        return [[str(f.relative_to(path)), stat.st_size, stat.st_mtime_ns] for f, stat in files]
    return None


def model_identity(spec: str, revision: str | None = None) -> dict:
    """What identifies a model's weights (spec, revision, local files' fingerprint)."""
    return {"spec": str(spec), "revision": revision, "files": checkpoint_fingerprint(str(spec))}


def texts_hash(texts: Sequence[str]) -> str:
    """SHA-256 of a list of texts (order kept)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def _items_hash(items: Sequence) -> str:
    questions = [[str(i.id), i.question, list(i.choices), int(i.answer)] for i in items]
    return hashlib.sha256(json.dumps(questions, ensure_ascii=False).encode()).hexdigest()


def data_identity(forget: Sequence[str], retain: Sequence[str], items: Sequence, retain_items: Sequence = ()) -> dict:
    """Hashes of the measured texts and questions (id, question, choices, answer); retain-set questions,
    where there are any, too."""
    identity = {"forget": texts_hash(forget), "retain": texts_hash(retain), "items": _items_hash(items),
                "counts": [len(forget), len(retain), len(items)]}
    if retain_items:
        identity["retain_items"] = _items_hash(retain_items)
    return identity


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; any other device as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_settings(*, max_length: int, batch_size: int, dtype: str, device: str) -> dict:
    """The evaluation settings a result depends on (``auto`` device and dtype resolved)."""
    device = resolve_device(device)
    if dtype == "auto":
        dtype = "float32" if device.startswith("cpu") else "bfloat16"  # as loading.torch_dtype
    return {"max_length": int(max_length), "batch_size": int(batch_size), "dtype": dtype, "device": device}


def memo_key(model: dict, transform: dict | None, data: dict, settings: dict) -> tuple[str, dict]:
    """(hex key, the keyed record): the hash of everything the evaluation depends on."""
    record = {"version": MEMO_VERSION, "model": model, "transform": transform, "data": data, "settings": settings}
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], json.loads(text)


class EvalMemo:
    """The memo of one output root: ``get(...)`` returns a stored result or computes and stores it."""

    def __init__(self, outdir: str | Path, force: bool = False, echo: Callable[[str], None] | None = None):
        self.folder = outputs.evaluations_dir(outdir)
        self.force = force
        self._echo = echo or (lambda message: None)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def read(self, key: str, record: dict) -> dict | None:
        """The stored entry of ``key`` (``{"result", "seconds"}``), or None if absent, damaged or of another record."""
        try:
            stored = json.loads(self.path(key).read_text())
            if stored["key"] != record or not isinstance(stored["result"], dict):
                return None
            return {"result": stored["result"], "seconds": float(stored["seconds"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, what: str, model: dict, transform: dict | None, data: dict, settings: dict,
            compute: Callable[[], dict]) -> tuple[dict, float]:
        """``(result, seconds)``: the stored result of this evaluation, else ``compute()``'s (then stored).

        ``seconds`` is how long the computation took when it ran (so reused rows keep their cost);
        ``what`` names the evaluation in the line echoed on reuse.
        """
        key, record = memo_key(model, transform, data, settings)
        if not self.force:
            stored = self.read(key, record)
            if stored is not None:
                self._echo(f"reusing the stored evaluation of {what} ({self.path(key)})")
                return stored["result"], stored["seconds"]
        started = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - started
        entry = {"key": record, "result": {k: _plain(v) for k, v in result.items()}, "seconds": seconds}
        atomic_write_text(self.path(key), json.dumps(entry, indent=1, sort_keys=True) + "\n")
        return result, seconds

    def evaluation(self, what: str, spec: str, revision: str | None, transform: dict | None, data,
                   settings: dict, compute: Callable[[], dict]) -> tuple[dict, float]:
        """``get`` for model ``spec`` (at ``revision``) evaluated on ``data`` (``forget``, ``retain``,
        ``items``) with ``settings`` (``eval_settings``): the keys every caller builds the same way."""
        return self.get(what, model_identity(spec, revision), transform,
                        data_identity(data.forget, data.retain, data.items, getattr(data, "retain_items", ())),
                        settings, compute)


def _plain(value: Any) -> Any:
    """A JSON-ready value: ints and strings as they are, other numbers as floats (NaN stays NaN),
    lists and dicts (the per-item results) element by element."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value)
