"""Time of the quantization-flip prediction on one matrix: the settings and dtype ``params`` uses now,
against the two float32 settings it used before (a ratio measured in the same run).

    OMP_NUM_THREADS=1 python benchmarks/bench_flips.py [--size 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from analyses.weights.quantization import PREDICTION_DTYPE, QUANT_SETTINGS, flip_stats


def seconds(w_a: np.ndarray, w_b: np.ndarray, settings, dtype: str) -> float:
    started = time.perf_counter()
    for setting in settings:
        flip_stats(w_a, w_b, setting, dtype)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="rows and columns of the matrix")
    size = parser.parse_args().size
    rng = np.random.default_rng(0)
    w_a = (rng.standard_normal((size, size)) * 0.02).astype(np.float32)
    w_b = w_a + (rng.standard_normal(w_a.shape) * 1e-4).astype(np.float32)
    before = seconds(w_a, w_b, ("int8", "int4-g32"), "float32")
    now = seconds(w_a, w_b, tuple(QUANT_SETTINGS), PREDICTION_DTYPE)
    print(f"{size}x{size}: before (int8, int4 g32; float32) {before:.1f} s, now ({', '.join(QUANT_SETTINGS)}; "
          f"{PREDICTION_DTYPE}) {now:.1f} s, ratio {now / before:.2f}")


if __name__ == "__main__":
    main()
