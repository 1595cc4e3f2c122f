"""Atomic output writing shared by every analysis: CSV, JSON, figures and completion markers.

Every file is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written file that looks finished. A folder counts as finished only once its marker
(written last, by ``mark_complete``) exists; ``is_complete`` lets a pipeline skip finished steps.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_path, atomic_write_text
from unlearn_lens.core.identity import plain
from unlearn_lens.core.outputs import COMPLETE_MARKER, clear_complete, is_complete  # noqa: F401  (the one marker scheme)


def _plain(value: Any) -> Any:
    """Turn numpy scalars/arrays into JSON-ready Python values; NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (numpy values converted, NaN written as null)."""
    return atomic_write_text(path, json.dumps(_plain(data), indent=2, sort_keys=False) + "\n")


def _format_cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return repr(value)  # full precision, round-trips exactly
    return value


def atomic_write_csv(
    path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """Write dict rows as a CSV atomically; ``columns`` fixes the column order (default: first row's keys)."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_format_cell(row.get(column, "")) for column in columns])
    return Path(path)


def atomic_save_figure(figure: Any, path: str | Path, dpi: int = 120, tight: bool = True) -> Path:
    """Save a matplotlib figure atomically as PNG (and close it if pyplot made it).

    ``tight=False`` keeps the figure's own margins: for figures laid out with fixed margins it
    saves the extra draw that computing a tight bounding box costs (a third of the save time).
    """
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight else None)
    finally:
        import sys

        if "matplotlib.pyplot" in sys.modules:  # a figure from pyplot.subplots stays registered until closed
            sys.modules["matplotlib.pyplot"].close(figure)
    return Path(path)


def mark_complete(directory: str | Path, info: Mapping[str, Any] | None = None,
                  inputs: Mapping[str, Any] | None = None) -> Path:
    """Write the completion marker of ``directory`` (call it after every other file is written).

    ``inputs`` (``unlearn_lens.core.identity.inputs_record``) say what the folder was made from;
    ``is_complete(directory, inputs)`` is then true only for a run with the same inputs.
    """
    record = {**({"inputs": plain(dict(inputs))} if inputs is not None else {}), **dict(info or {})}
    return outputs.mark_complete(directory, json.dumps(_plain(record), indent=2, sort_keys=False) + "\n")
