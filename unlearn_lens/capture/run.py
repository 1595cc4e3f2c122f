"""The capture loop: every pending block of every split, through the model and into the writer.

``capture`` checks the destination, tokenises the inputs and plans the cache's size (refusing
one that would not fit) before any weight is loaded; then, per split, it creates or resumes the
split's group and hands each batch's kept arrays to the split writer, which writes behind it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cache_store import CacheWriter, SplitLayout, SplitWriter, choose_token_chunk
from cache_store.store import settle_finished
from cache_store.writer import content_fingerprint
from unlearn_lens.capture.arrays import dynamic_arrays, static_arrays, wmdp_static
from unlearn_lens.capture.forward import BatchRunner
from unlearn_lens.capture.inputs import SplitInputs, build_inputs
from unlearn_lens.capture.plan import CapturePlan, model_shape, plan_capture, refuse_if_too_big
from unlearn_lens.capture.selection import Kept, resolve, sample_positions
from unlearn_lens.capture.settings import STORE_DTYPES, CaptureRun, CaptureSettings
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_at_least, check_counts

#: Test hook: SIGKILL this process once this many batches are written (proves resumption).
KILL_ENV = "UNLEARN_LENS_CAPTURE_KILL_AFTER_BATCHES"


def batches(layout: SplitLayout, block: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Consecutive sample ranges of one block (consecutive, so tokens stay contiguous)."""
    first, stop = layout.block_sample_range(block)
    for start in range(first, stop, batch_size):
        yield start, min(start + batch_size, stop)


def capture_split(runner: BatchRunner, writer: SplitWriter, inputs: SplitInputs, settings: CaptureSettings,
                  on_batch: Callable[[], None], positions: list[np.ndarray] | None = None) -> None:
    """Run every pending block of this process's shard and hand the results to the writer."""
    layout = writer.layout
    for block in writer.pending_blocks(*settings.shard):
        for start, stop in batches(layout, block, settings.batch_size):
            extra = {name: values[start:stop] for name, values in inputs.sample_arrays.items()}
            kept = positions[start:stop] if positions is not None else None
            writer.submit(block, runner.run(inputs.token_ids[start:stop], inputs.split, extra, kept))
            on_batch()
        writer.end_block(block)


def _kill_hook() -> Callable[[SplitWriter], None]:
    limit = int(os.environ.get(KILL_ENV, "0") or 0)
    count = [0]

    def after_batch(writer: SplitWriter) -> None:
        count[0] += 1
        if limit and count[0] >= limit:
            writer.drain()
            os.kill(os.getpid(), signal.SIGKILL)

    return after_batch


def check_settings(settings: CaptureSettings) -> None:
    """One-line errors for settings no capture can run with (before anything is loaded)."""
    if settings.dtype not in STORE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)}")
    check_counts(batch_size=settings.batch_size)
    check_at_least("--block-samples", settings.block_samples, 1)
    check_at_least("--writer-threads", settings.writer_threads, 1)


def prepare(model_spec: str, data_dir: str | Path, out: str, settings: CaptureSettings, *,
            revision: str | None = None, trust_remote_code: bool = False):
    """Check the destination, tokenise every split and plan the cache, loading no weight.

    Returns ``(tokenizer, inputs, plan)``; refuses (one line) a folder that holds no cache and a
    cache that would not fit the free space at ``out``.
    """
    from cache_store.access import check_writable
    from unlearn_lens.loading import load_config, load_tokenizer

    check_settings(settings)
    check_writable(out)  # read-only URL, a folder holding no cache, credentials, bucket, endpoint, permissions
    tokenizer = load_tokenizer(model_spec, revision, trust_remote_code)
    shape = model_shape(load_config(model_spec, revision, trust_remote_code))
    inputs = build_inputs(tokenizer, data_dir, list(settings.splits), settings.max_samples, settings.max_length)
    plan = plan_capture(shape, inputs, settings.selection, dtype=settings.dtype, codec=settings.codec,
                        threads=settings.threads, device=settings.device, out=out)
    return tokenizer, inputs, plan


def plan_only(model_spec: str, data_dir: str | Path, out: str, settings: CaptureSettings, *,
              revision: str | None = None, trust_remote_code: bool = False) -> CapturePlan:
    """``capture --plan``: what the capture would write and how long it would take; nothing is written."""
    return prepare(model_spec, data_dir, out, settings, revision=revision, trust_remote_code=trust_remote_code)[2]


def capture(model_spec: str, data_dir: str | Path, out: str, settings: CaptureSettings, *,
            revision: str | None = None, arch_spec: str | None = None,
            trust_remote_code: bool = False) -> dict[str, str]:
    """Capture every requested split of one model into the cache at ``out``.

    Returns each split's state: ``complete``, ``already complete`` or ``shard done`` (other
    shards still running). Resumes whatever an earlier, interrupted run finished.
    """
    from tqdm.auto import tqdm

    from unlearn_lens import data as datasets
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.capture.provenance import provenance
    from unlearn_lens.loading import load_model

    tokenizer, inputs, plan = prepare(model_spec, data_dir, out, settings, revision=revision,
                                      trust_remote_code=trust_remote_code)
    refuse_if_too_big(plan, inputs, settings.selection)  # before any model loads
    data_hash = datasets.data_hash(data_dir)
    model, _ = load_model(model_spec, revision=revision, dtype=settings.model_dtype, device=settings.device,
                          trust_remote_code=trust_remote_code, with_tokenizer=False)
    adapter = ArchitectureAdapter(model, arch_spec)
    kept = resolve(settings.selection, adapter.num_layers)
    prov = provenance(model_spec, revision, model, tokenizer, adapter, data_hash=data_hash,
                      max_length=settings.max_length, dtype=settings.dtype)
    writer = CacheWriter(out, prov, overwrite=settings.overwrite, codec=settings.codec)
    letters, wmdp_extras = wmdp_static(model, tokenizer, adapter) if "wmdp" in inputs else (None, {})
    runner = BatchRunner(model, adapter, settings.dtype, letters, kept)
    kill_hook = _kill_hook()
    states: dict[str, str] = {}
    # Every split's group exists (not complete) before any forward pass, so that a capture killed
    # between two splits never leaves a cache that reads complete without its later splits.
    opened = {split: open_split(writer, split_inputs, settings, kept, prov["hidden_size"], wmdp_extras)
              for split, split_inputs in inputs.items()}
    for split, split_inputs in inputs.items():
        split_writer, positions = opened[split]
        if split_writer.complete:
            states[split] = "already complete"
            continue
        layout = split_writer.layout
        pending = split_writer.pending_blocks(*settings.shard)
        total = sum(len(range(*layout.block_sample_range(b), settings.batch_size)) for b in pending)
        bar = tqdm(total=total, desc=f"capture {split}", unit="batch", disable=not settings.progress,
                   file=sys.stderr)
        split_writer.start()
        try:
            capture_split(runner, split_writer, split_inputs, settings,
                          lambda: (bar.update(1), kill_hook(split_writer)), positions)
        finally:
            bar.close()
            split_writer.close()
        states[split] = "complete" if split_writer.finalize_if_done() else "shard done"
    settle_finished(out)  # what a capture killed while finishing left: stale metadata, temporary files
    return states


def open_split(writer: CacheWriter, inputs: SplitInputs, settings: CaptureSettings, kept: Kept, hidden: int,
               wmdp_extras: dict) -> tuple[SplitWriter, list[np.ndarray] | None]:
    """Create or resume one split's group; returns its writer and the positions kept of each sample."""
    split = inputs.split
    positions = sample_positions(split, inputs.lengths, kept.token_sample, kept.seed, inputs.sample_arrays)
    counts = inputs.lengths if positions is None else np.array([len(p) for p in positions], dtype=np.int64)
    itemsize = np.dtype(settings.dtype).itemsize
    chunk = settings.token_chunk or choose_token_chunk(hidden, itemsize, counts, settings.block_samples)
    layout = SplitLayout(counts, settings.block_samples, chunk)
    sizes = {"layer": len(kept.resid_layers), "mlp_layer": len(kept.mlp_layers), "hidden": hidden, "choice": 4,
             "token": layout.n_tokens, "sample": layout.n_samples, "text_token": int(inputs.lengths.sum())}
    attrs = {"max_samples": settings.max_samples,
             "content_fingerprint": content_fingerprint(np.concatenate(inputs.token_ids))}
    if kept.attrs() is not None:
        attrs["selection"] = kept.attrs()
    split_writer = writer.open_split(
        split, layout, sizes=sizes, static=static_arrays(inputs, layout, wmdp_extras, positions),
        dynamic=dynamic_arrays(split, settings.dtype, kept.variables), attrs=attrs,
        threads=settings.threads, background=str(settings.device).startswith("cpu"))
    return split_writer, positions


def run_capture(run: CaptureRun) -> dict[str, str]:
    """``capture`` with the model reference of ``run``; returns each split's state."""
    return capture(run.model.spec, run.data, run.out, run.settings, revision=run.model.revision,
                   arch_spec=run.model.arch_spec, trust_remote_code=run.model.trust_remote_code)
