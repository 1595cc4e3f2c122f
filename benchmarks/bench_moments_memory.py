"""Peak memory of the covariance reduction: spectra per layer chunk inside the graph vs all layers' d x d.

``analyze`` needs each layer's d x d centred second moment only for its eigenvalues. Computing
them inside the reduction graph (``token_moments(..., finish=covariance.keep_spectra)``) frees
each layer's matrix as soon as its spectrum exists; the baseline, measured in the same run,
reduces every layer's matrix first and eigendecomposes afterwards (what ``analyze`` did before),
holding L float64 d x d matrices at once (4.4 GB for a 7B model, per model and split).

Each variant runs in a fresh subprocess on the same synthetic float16 activations (generated
chunk by chunk, never held whole) with dask's threaded scheduler; the script prints wall time,
the subprocess's peak RSS, and checks that both variants give the same spectra.

    python benchmarks/bench_moments_memory.py [--layers 24] [--hidden 2048] [--tokens 2048] [--chunk 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(variant: str, layers: int, hidden: int, tokens: int, chunk: int) -> dict:
    import dask
    import dask.array as da
    import numpy as np

    from analyses.activations import covariance
    from analyses.activations.reductions import token_moments

    rng = da.random.default_rng(0)
    x = (rng.standard_normal((layers, tokens, hidden), chunks=(1, chunk, hidden), dtype=np.float32)
         * da.linspace(0.1, 2.0, hidden, chunks=hidden)).astype(np.float16)
    mask = da.ones(tokens, chunks=chunk, dtype=np.int8)
    start = time.perf_counter()
    if variant == "in-graph":
        moments = dask.compute(token_moments(x, mask, finish=covariance.keep_spectra))[0]
        spectra = moments.spectra
    else:
        moments = dask.compute(token_moments(x, mask))[0]
        spectra = covariance.layer_spectra(moments)
    took = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "seconds": took, "peak_rss_mb": peak_mb,
            "spectra_head": spectra[:, :4].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=512, help="tokens per chunk")
    parser.add_argument("--variant", choices=["in-graph", "all-layers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.layers, args.hidden, args.tokens, args.chunk)
    if args.variant:
        print(json.dumps(run_variant(args.variant, *shape)))
        return
    results = {}
    for variant in ("all-layers", "in-graph"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--layers", str(args.layers),
                              "--hidden", str(args.hidden), "--tokens", str(args.tokens), "--chunk", str(args.chunk)],
                             check=True, capture_output=True, text=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    import numpy as np

    np.testing.assert_allclose(results["in-graph"]["spectra_head"], results["all-layers"]["spectra_head"], rtol=1e-6)
    matrix_mb = args.hidden ** 2 * 8 / 1e6
    print(f"{args.layers} layers x {args.tokens} tokens x hidden {args.hidden} (float16, chunks of {args.chunk} tokens); "
          f"one float64 d x d matrix = {matrix_mb:.0f} MB, all layers = {args.layers * matrix_mb:.0f} MB")
    for variant, got in results.items():
        print(f"{variant:10s} wall {got['seconds']:7.1f} s   peak RSS {got['peak_rss_mb']:7.0f} MB")
    base, ours = results["all-layers"], results["in-graph"]
    print(f"peak RSS ratio all-layers / in-graph: {base['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x; "
          f"time ratio: {base['seconds'] / ours['seconds']:.2f}x; spectra equal")


if __name__ == "__main__":
    main()
