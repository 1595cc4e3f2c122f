"""Can the cache writer keep up at 6.9B? Sustained ingestion of the real writer against the disk.

A producer hands the real ``SplitWriter`` (the capture's writer: chunking, zstd-1 or no codec,
crc32c, stores, block records) activations of the GPT-NeoX 6.9B shape (33 residual + 32 MLP-input
layers x 4096, float16; texts of 512 tokens) as fast as it can: a few batches are generated once
and handed over again and again, so the producer costs nothing. Measured in one run:

* the disk's sequential write bandwidth (a file written and fsynced);
* the writer's per-thread rate with nothing stored (encoding and chunking only): its per-core rate;
* sustained ingestion (activation bytes handed in per second, until every chunk is written and the
  filesystem synced) for 1, 2, ... writer threads, per codec;
* the ratio of the best ingestion to min(disk bandwidth, per-core rate x cores) (target >= 0.8);
* a projection for the deep-ignorance setting (GPT-NeoX 6.9B, 500 texts x 512 tokens per split,
  forget and retain) at the capture defaults and at a recommended setting: bytes, forward time at a
  stated H100 rate, writer time at the measured per-core rate and a GPU node's core count, disk time.

    python benchmarks/bench_capture_scale.py [--workdir /tmp/bench_capture_scale] [--texts 16]
        [--threads 1,2,4] [--disk-gb 4] [--node-cores 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np

LAYERS, HIDDEN, TOKENS_PER_TEXT = 32, 4096, 512
PROVENANCE = {"family": "gpt_neox", "num_layers": LAYERS, "hidden_size": HIDDEN, "weights_fingerprint": "bench",
              "tokenizer_fingerprint": "bench", "data_manifest_hash": "bench", "max_length": TOKENS_PER_TEXT,
              "dtype": "float16", "model_dtype": "bfloat16", "model": "synthetic 6.9B shape",
              "final_norm_kind": "layernorm", "final_norm_eps": 1e-5}
#: The recommended setting of the projection (README, "Sharing caches").
RECOMMENDED = {"layers": "every:4", "token_sample": 64}


def activations(rng: np.random.Generator, n_layers: int, tokens: int) -> np.ndarray:
    """float16 states with per-dimension scales (a few large dimensions, as real residual streams have)."""
    scale = np.exp(rng.normal(0.0, 1.0, size=HIDDEN)).astype(np.float32)
    out = np.empty((n_layers, tokens, HIDDEN), dtype=np.float16)
    for layer in range(n_layers):
        out[layer] = (rng.standard_normal((tokens, HIDDEN), dtype=np.float32) * scale).astype(np.float16)
    return out


def disk_bandwidth(folder: Path, gigabytes: float) -> float:
    """Bytes per second of a sequential write of ``gigabytes``, fsynced (the page cache does not count)."""
    block = np.random.default_rng(1).integers(0, 255, size=64 << 20, dtype=np.uint8).tobytes()
    path = folder / "disk-test.bin"
    os.sync()
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(int(gigabytes * 1e9) // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    written = path.stat().st_size
    path.unlink()
    return written / seconds


def ingest(url: Path, batches: list[dict], n_texts: int, batch_texts: int, threads: int, codec: str,
           store: bool = True) -> float:
    """Activation bytes per second taken in by one split writer until everything is written (and synced)."""
    from cache_store import CacheWriter, Dynamic, SplitLayout
    from cache_store.writer import content_fingerprint

    shutil.rmtree(url, ignore_errors=True)
    layout = SplitLayout(np.full(n_texts, TOKENS_PER_TEXT), block_samples=8, token_chunk=512)
    dynamic = {"resid": Dynamic(("layer", "token", "hidden"), "float16"),
               "mlp_in": Dynamic(("mlp_layer", "token", "hidden"), "float16"),
               "last": Dynamic(("layer", "sample", "hidden"), "float16")}
    sizes = {"layer": LAYERS + 1, "mlp_layer": LAYERS, "hidden": HIDDEN, "token": layout.n_tokens,
             "sample": layout.n_samples}
    writer = CacheWriter(str(url), PROVENANCE, codec=codec).open_split(
        "forget", layout, sizes=sizes, static={}, dynamic=dynamic,
        attrs={"content_fingerprint": content_fingerprint(np.zeros(1))}, threads=threads)
    if not store:
        writer.sink.put = lambda key, data: None  # encoding and chunking only: the writer's CPU rate
    os.sync()
    handed = 0
    start = time.perf_counter()
    writer.start()
    for block in range(layout.n_blocks):
        first, stop = layout.block_sample_range(block)
        for index, at in enumerate(range(first, stop, batch_texts)):
            batch = batches[index % len(batches)]
            writer.submit(block, batch)
            handed += sum(values.nbytes for values in batch.values())
        writer.end_block(block)
    writer.close()
    if store:
        os.sync()
    seconds = time.perf_counter() - start
    if store:
        assert writer.finalize_if_done()
    shutil.rmtree(url, ignore_errors=True)
    return handed / seconds


def projection(writer_rate: dict[str, float], disk: float, node_cores: int) -> list[str]:
    """Markdown rows: the deep-ignorance setting's size and times, at the defaults and recommended flags."""
    from unlearn_lens.capture.inputs import SplitInputs
    from unlearn_lens.capture.plan import GPU_FLOPS, STORED_SHARE, ModelShape, duration, size, split_plan
    from unlearn_lens.capture.selection import Selection, resolve

    shape = ModelShape(LAYERS, HIDDEN, 4 * HIDDEN, 50304, gated=False)
    texts = [np.zeros(TOKENS_PER_TEXT, dtype=np.int32)] * 500
    rows = ["| setting | codec | on disk (forget + retain) | forward at 400 TFLOP/s | "
            f"writer, {node_cores - 1} threads | disk at {disk / 1e9:.2f} GB/s (measured) | disk at 2 GB/s (NVMe) "
            "| bound |", "|---|---|---|---|---|---|---|---|"]
    settings = (("defaults", Selection()), ("--layers every:4 --token-sample 64", Selection(**RECOMMENDED)))
    for label, selection in settings:
        kept = resolve(selection, LAYERS)
        for codec in ("zstd1", "none"):
            plans = [split_plan(SplitInputs(split, texts), shape, kept, "float16", codec)
                     for split in ("forget", "retain")]
            stored = sum(p.total for p in plans)
            share = STORED_SHARE[(codec, "float16")]
            raw = sum(b for p in plans for name, b in p.bytes.items() if name != "other") / share
            tokens = sum(p.tokens for p in plans)
            times = {"forward": tokens * shape.flops_per_token / GPU_FLOPS,
                     "writer": raw / (writer_rate[codec] * (node_cores - 1)), "disk": stored / 2e9}
            rows.append(f"| {label} | {codec} | {size(stored)} | {duration(times['forward'])} | "
                        f"{duration(times['writer'])} | {duration(stored / disk)} | {duration(times['disk'])} | "
                        f"{max(times, key=times.get)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_capture_scale")
    parser.add_argument("--texts", type=int, default=16, help="texts of 512 tokens per measurement (272 MB each)")
    parser.add_argument("--batch-texts", type=int, default=2, help="texts per batch handed to the writer")
    parser.add_argument("--threads", default="1,2,4", help="writer thread counts to measure")
    parser.add_argument("--codecs", default="zstd1,none")
    parser.add_argument("--disk-gb", type=float, default=4.0, help="size of the sequential-write test")
    parser.add_argument("--node-cores", type=int, default=16, help="cores of the GPU node in the projection")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    print(f"cores: {cores}; load average before: {os.getloadavg()}")
    rng = np.random.default_rng(0)
    tokens = args.batch_texts * TOKENS_PER_TEXT
    batches = [{"resid": activations(rng, LAYERS + 1, tokens), "mlp_in": activations(rng, LAYERS, tokens)}
               for _ in range(2)]
    for batch in batches:
        ends = np.arange(TOKENS_PER_TEXT - 1, tokens, TOKENS_PER_TEXT)
        batch["last"] = np.ascontiguousarray(batch["resid"][:, ends])
    print(f"batch: {args.batch_texts} texts x {TOKENS_PER_TEXT} tokens, "
          f"{sum(v.nbytes for v in batches[0].values()) / 1e9:.2f} GB; {args.texts} texts per measurement "
          f"({args.texts / args.batch_texts * sum(v.nbytes for v in batches[0].values()) / 1e9:.1f} GB)")

    disk = disk_bandwidth(work, args.disk_gb)
    print(f"disk sequential write (fsynced, {args.disk_gb:.0f} GB): {disk / 1e9:.3f} GB/s")
    codecs = args.codecs.split(",")
    per_core = {codec: ingest(work / "c.zarr", batches, args.texts, args.batch_texts, 1, codec, store=False)
                for codec in codecs}
    for codec, rate in per_core.items():
        print(f"writer per-core rate ({codec}, 1 thread, nothing stored): {rate / 1e9:.3f} GB/s")
    results = {}
    for codec in codecs:
        for threads in (int(t) for t in args.threads.split(",")):
            results[(codec, threads)] = ingest(work / "c.zarr", batches, args.texts, args.batch_texts, threads, codec)
            print(f"ingestion {codec}, {threads} writer thread(s): {results[(codec, threads)] / 1e9:.3f} GB/s")
    print("\n| codec | writer threads | sustained ingestion (GB/s) | vs min(disk, per-core x cores) |")
    print("|---|---|---|---|")
    for (codec, threads), rate in results.items():
        bound = min(disk, per_core[codec] * cores)
        print(f"| {codec} | {threads} | {rate / 1e9:.3f} | {rate / bound:.2f} |")
    for codec in codecs:
        best = max(rate for (c, _), rate in results.items() if c == codec)
        bound = min(disk, per_core[codec] * cores)
        which = "disk" if disk <= per_core[codec] * cores else f"per-core rate x {cores} cores"
        print(f"{codec}: best ingestion {best / 1e9:.3f} GB/s = {best / bound:.2f} x min(disk {disk / 1e9:.3f}, "
              f"per-core x cores {per_core[codec] * cores / 1e9:.3f}) GB/s (the {which}); target >= 0.8")
    print(f"load average after: {os.getloadavg()}\n")
    print("\n".join(projection(per_core, disk, args.node_cores)))


if __name__ == "__main__":
    main()
