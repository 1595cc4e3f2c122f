"""Parameter diagnostics at 7B width: our Lanczos/Gram path against a full-SVD reference.

Writes synthetic GPT-NeoX-shaped checkpoints 4096 wide (hidden 4096, MLP 16384, qkv 12288 x
4096), one float16 safetensors shard per layer, with 2 and with 8 layers; the modified model is
base + a rank-8 update + small noise (std 1e-5). Then, in the same run:

* ours: ``run_params(steps=("stats",))`` in a fresh subprocess per layer count (wall time and the
  subprocess's own peak RSS), without and with ``--empirical-rank``;
* reference: ``numpy.linalg.svd(compute_uv=False)`` of dW and W (float32) for one matrix of each
  distinct SVD cost of layer 0 (qkv, dense, dense_h_to_4h; dense_4h_to_h is its transpose, same
  cost), extrapolated per matrix to every layer (it excludes reading the weights: conservative).

    python benchmarks/bench_params.py [--layers 2,8] [--workdir /tmp/bench_params] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, MLP, VOCAB, RANK = 4096, 16384, 1024, 8
BLAS_THREADS = 1  # set by --blas-threads; the same for ours and the reference
SHAPES = {  # name -> stored shape (out, in)
    "attention.query_key_value.weight": (3 * HIDDEN, HIDDEN),
    "attention.dense.weight": (HIDDEN, HIDDEN),
    "mlp.dense_h_to_4h.weight": (MLP, HIDDEN),
    "mlp.dense_4h_to_h.weight": (HIDDEN, MLP),
}


def _config(layers: int) -> dict:
    return {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": HIDDEN,
            "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": 32,
            "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "float16"}


def _layer_tensors(rng: np.random.Generator, layer: int) -> tuple[dict, dict]:
    base, modified = {}, {}
    for suffix, (m, n) in SHAPES.items():
        name = f"gpt_neox.layers.{layer}.{suffix}"
        w = rng.standard_normal((m, n), dtype=np.float32)
        w *= 0.02
        u = np.linalg.qr(rng.standard_normal((m, RANK)))[0].astype(np.float32)
        v = np.linalg.qr(rng.standard_normal((n, RANK)))[0].astype(np.float32)
        update = (u * np.geomspace(1.0, 0.1, RANK).astype(np.float32)) @ v.T
        update += 1e-5 * rng.standard_normal((m, n), dtype=np.float32)
        base[name] = w.astype(np.float16)
        update += w
        modified[name] = update.astype(np.float16)
        del w, update
    for norm in ("input_layernorm", "post_attention_layernorm"):
        for kind in ("weight", "bias"):
            base[f"gpt_neox.layers.{layer}.{norm}.{kind}"] = np.ones(HIDDEN, np.float16)
    for key in list(base):
        modified.setdefault(key, base[key])
    return base, modified


def write_pair(root: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """Two sharded float16 checkpoints (one shard per layer) under ``root``; reused if present."""
    from safetensors.numpy import save_file

    dirs = (root / f"base_{layers}", root / f"modified_{layers}")
    if all((d / "model.safetensors.index.json").is_file() for d in dirs):
        return dirs
    rng = np.random.default_rng(seed)
    weight_maps: tuple[dict, dict] = ({}, {})
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(_config(layers)))
    extras = {"gpt_neox.embed_in.weight": (0.02 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float16),
              "embed_out.weight": (0.02 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float16),
              "gpt_neox.final_layer_norm.weight": np.ones(HIDDEN, np.float16)}
    for layer in range(layers):
        tensors = _layer_tensors(rng, layer)
        if layer == 0:
            for t in tensors:
                t.update(extras)
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        for d, t, wm in zip(dirs, tensors, weight_maps):
            save_file(t, str(d / shard), metadata={"format": "pt"})
            wm.update({name: shard for name in t})
        del tensors
        print(f"  wrote layer {layer + 1}/{layers}", flush=True)
    for d, wm in zip(dirs, weight_maps):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dirs


_CHILD = """
import json, resource, sys, time
from analyses.weights.params import run_params
a, b, out, emp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t = time.perf_counter()
s = run_params(a, b, out, steps=("stats",), num_matrices=0, empirical_rank=emp, force=True)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "num_matrices": s["num_matrices"], "median_dW_stable_rank": s["median_dW_stable_rank"]}))
"""


def run_ours(a: Path, b: Path, out: Path, empirical: bool) -> dict:
    """Our implementation in a fresh process: wall time and that process's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TQDM_DISABLE": "1",
           "OPENBLAS_NUM_THREADS": str(BLAS_THREADS), "OMP_NUM_THREADS": str(BLAS_THREADS)}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(a), str(b), str(out), "1" if empirical else "0"],
                            capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def reference_seconds(a: Path, b: Path) -> dict[str, float]:
    """Full-SVD reference on layer 0: seconds per matrix (dW and W) for each distinct shape."""
    from analyses.weights.checkpoints import open_checkpoint

    ca, cb = open_checkpoint(str(a)), open_checkpoint(str(b))
    seconds = {}
    for suffix in ("attention.query_key_value.weight", "attention.dense.weight", "mlp.dense_h_to_4h.weight"):
        name = f"gpt_neox.layers.0.{suffix}"
        w = ca.read_matrix(name)
        dw = cb.read_matrix(name) - w
        start = time.perf_counter()
        for matrix in (dw, w):
            s = np.linalg.svd(matrix, compute_uv=False)
            _ = (s[0], np.sum(s**2) / s[0] ** 2, np.searchsorted(np.cumsum(s**2), 0.99 * np.sum(s**2)) + 1)
        seconds[suffix] = time.perf_counter() - start
        print(f"  reference {suffix} {w.shape}: {seconds[suffix]:.1f} s (dW + W)", flush=True)
    seconds["mlp.dense_4h_to_h.weight"] = seconds["mlp.dense_h_to_4h.weight"]  # transpose: same cost
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,8", help="comma-separated layer counts")
    parser.add_argument("--workdir", default="/tmp/bench_params", help="where the checkpoints go (~0.8 GB per layer)")
    parser.add_argument("--empirical-layers", default="2", help="layer counts also timed with --empirical-rank")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS/LAPACK threads for both sides (1: stable timings on a shared machine)")
    args = parser.parse_args()
    global BLAS_THREADS
    BLAS_THREADS = args.blas_threads
    from threadpoolctl import threadpool_limits

    threadpool_limits(BLAS_THREADS)
    root = Path(args.workdir)
    counts = [int(x) for x in args.layers.split(",")]
    emp_counts = [int(x) for x in args.empirical_layers.split(",") if x]
    print(f"cpus={os.cpu_count()} blas_threads={BLAS_THREADS} load={os.getloadavg()}", flush=True)
    results: dict = {"ours": {}, "ours_empirical": {}}
    reference = None
    for layers in counts:
        t = time.perf_counter()
        a, b = write_pair(root, layers)
        print(f"{layers} layers: checkpoints written in {time.perf_counter() - t:.0f} s", flush=True)
        if reference is None:
            reference = reference_seconds(a, b)
        results["ours"][layers] = run_ours(a, b, root / f"out_{layers}", empirical=False)
        print(f"  ours: {results['ours'][layers]}", flush=True)
        if layers in emp_counts:
            results["ours_empirical"][layers] = run_ours(a, b, root / f"out_emp_{layers}", empirical=True)
            print(f"  ours --empirical-rank: {results['ours_empirical'][layers]}", flush=True)
        if not args.keep:
            shutil.rmtree(a), shutil.rmtree(b)
    per_layer_ref = sum(reference.values())
    print(f"\nreference (full SVD of dW and W, extrapolated): {per_layer_ref:.1f} s per layer", flush=True)
    for kind, table in results.items():
        for layers, r in table.items():
            ref = per_layer_ref * layers
            print(f"{kind:15s} layers={layers}: {r['seconds']:.1f} s vs reference {ref:.0f} s -> "
                  f"{ref / r['seconds']:.1f}x faster; peak RSS {r['peak_rss_mb']:.0f} MB; "
                  f"{r['num_matrices']} matrices", flush=True)
    print(f"load at end={os.getloadavg()}")


if __name__ == "__main__":
    main()
