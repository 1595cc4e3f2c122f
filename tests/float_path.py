"""Tolerances for stored reference values that another CPU's arithmetic moves (conftest's ROUNDING class).

A CSV stored on one machine (a training log, a pipeline's outputs) carries that machine's rounding:
another kernel set (``ATEN_CPU_CAPABILITY``), another BLAS or another thread count rounds differently,
and training steps amplify the difference (Adam divides by sqrt(v): a gradient near zero turns a last-
bit difference into up to lr per step), as do finite differences and float16 caches. No fixed
tolerance fits every value: each is as sensitive as its code path makes it.

So the tolerance is measured on the machine, from the code path under test: the same run made from
models whose every float32 weight is moved to a neighbouring float32 (one ulp, a seeded random
direction: ``one_ulp_copy``), which is the size of the difference another machine's arithmetic makes.
Each value may differ from the stored one by ``FACTOR`` times the largest change those runs show
(per value, or per column when one perturbed run is all a test can afford), and never by less than
float32 accumulation allows (``RTOL_FLOOR``). ``FACTOR`` = 10: across the unlearning logs and the
tiny pipeline, a run under ``ATEN_CPU_CAPABILITY=default`` and ``avx2`` differed from the stored
values by at most 2.3 times the one-ulp spread (three perturbations; one per column for the pipeline: 1.5).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

#: how many times the one-ulp spread a stored value may be off
FACTOR = 10.0
#: float32 sums of ~100 terms in another order (u = 6e-8 each): the least any value is allowed
RTOL_FLOOR = 1e-5
#: values this close to zero are compared absolutely
ATOL_FLOOR = 1e-9

Table = list[list[str]]  # a CSV: the header row, then the rows, as strings


def one_ulp_copy(source: str | Path, target: str | Path, seed: int) -> Path:
    """Copy a model directory, moving every float32 weight to its neighbour above or below (seeded).

    The direction depends only on the seed and the tensor's name, so two models given the same seed
    move their identical weights identically (an unchanged matrix keeps dW = 0).
    """
    from safetensors.numpy import load_file, save_file

    target = Path(target)
    shutil.copytree(source, target)
    for file in sorted(target.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name, value in tensors.items():
            if value.dtype == np.float32:
                rng = np.random.default_rng([seed, *name.encode()])
                towards = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
                tensors[name] = np.nextafter(value, towards)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return target


def read_table(path: str | Path) -> Table:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _change(a: str, b: str) -> float:
    """|a - b| for numbers (0 for equal text or two NaNs; inf for text that differs)."""
    x, y = _number(a), _number(b)
    if x is None or y is None:
        return 0.0 if a == b else math.inf
    if x == y or (math.isnan(x) and math.isnan(y)):  # infinities included
        return 0.0
    return abs(x - y)


def spreads(reference: Table, perturbed: Iterable[Table], by: str = "cell") -> list[list[float]]:
    """The relative change of each cell across the perturbed runs (their largest), or of each column
    (``by="column"``: the column's largest relative change, given to every cell of it)."""
    runs = list(perturbed)
    out = [[0.0] * len(row) for row in reference[1:]]
    for i, row in enumerate(reference[1:], start=1):
        for j, cell in enumerate(row):
            scale = max(abs(_number(cell) or 0.0), ATOL_FLOOR)
            out[i - 1][j] = max((_change(cell, run[i][j]) / scale for run in runs), default=0.0)
    if by == "column":
        width = len(reference[0])
        top = [max((row[j] for row in out if j < len(row) and math.isfinite(row[j])), default=0.0)
               for j in range(width)]
        out = [[top[j] for j in range(len(row))] for row in out]
    return out


def assert_tables_close(got: Table, want: Table, relative_spread: Sequence[Sequence[float]], what: str = "") -> None:
    """Every cell of ``got`` equals ``want``'s within ``max(FACTOR * spread, RTOL_FLOOR)`` relative
    (``ATOL_FLOOR`` absolute near zero); text equal; the same header and shape."""
    assert got[0] == want[0], (what, got[0], want[0])  # the same columns in the same order
    assert len(got) == len(want), (what, len(got), len(want))
    for i, (row_got, row_want) in enumerate(zip(got[1:], want[1:])):
        assert len(row_got) == len(row_want), (what, row_got)
        for j, (a, b) in enumerate(zip(row_got, row_want)):
            x = _number(b)
            if x is None or _number(a) is None:
                assert a == b, (what, f"row {i + 1} {want[0][j]}: {a!r} vs stored {b!r}")
                continue
            change = _change(a, b)
            if change == 0:
                continue
            allowed = max(FACTOR * relative_spread[i][j], RTOL_FLOOR) * abs(x) + ATOL_FLOOR
            assert change <= allowed, (f"{what} row {i + 1} {want[0][j]}: {a} vs stored {b} (off by {change:.3g}, "
                                       f"allowed {allowed:.3g} = max({FACTOR:g} x the one-ulp spread "
                                       f"{relative_spread[i][j]:.2g}, {RTOL_FLOOR:g}) relative)")
