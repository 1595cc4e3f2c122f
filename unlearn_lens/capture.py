"""Activation capture: one nnsight trace per batch, written through ``cache_store`` (issue 3).

For every sample it records the residual stream at every layer (layer 0 = the first block's
input = the embedding output; layer l = block l's output, before the final norm), every MLP's
input, the last real token's state and, for WMDP, the model's own final letter logits and cloze
log-probs from the same trace. Padding is dropped before anything is written.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cache_store import CacheWriter, Dynamic, SplitLayout, SplitWriter, choose_token_chunk
from cache_store.writer import content_fingerprint
from unlearn_lens.capture_inputs import SplitInputs, build_inputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.settings import (CACHE_DTYPES, CAPTURE_MAX_SAMPLES, DEFAULT_BATCH_SIZE, DEFAULT_DEVICE,
                                        DEFAULT_DTYPE, DEFAULT_MAX_LENGTH, ModelRef)

STORE_DTYPES = ("float16", "float32")
DEFAULT_BLOCK_SAMPLES = 32
#: Config keys of families whose logits are not just the unembedding of the final norm's output.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
#: Test hook: SIGKILL this process once this many batches are written (proves resumption).
KILL_ENV = "UNLEARN_LENS_CAPTURE_KILL_AFTER_BATCHES"


@dataclass
class CaptureSettings:
    """Everything that decides what is captured and how (the CLI flags)."""

    splits: tuple[str, ...] = ("forget", "retain", "wmdp", "wmdp_cloze")
    max_samples: int = CAPTURE_MAX_SAMPLES
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: str = CACHE_DTYPES[0]  # storage dtype of the activations
    model_dtype: str = DEFAULT_DTYPE
    device: str = DEFAULT_DEVICE
    shard: tuple[int, int] = (1, 1)
    overwrite: bool = False
    block_samples: int = DEFAULT_BLOCK_SAMPLES
    token_chunk: int | None = None
    progress: bool = True


# --- one batch ---------------------------------------------------------------------------------

class BatchRunner:
    """Runs one nnsight trace over a right-padded batch and returns numpy arrays of real tokens."""

    def __init__(self, model, adapter, store_dtype: str, letter_ids: list[int] | None = None):
        from nnsight import NNsight

        self.model, self.adapter = model, adapter
        self.traced = NNsight(model)
        self.store_dtype = store_dtype
        self.letter_ids = letter_ids
        self.device = next(model.parameters()).device
        config = getattr(model, "config", None)
        # The unembedding alone turns final-norm states into the model's logits unless the family
        # rescales or soft-caps them afterwards; then the trace runs to the model's own output.
        self.head_only = not any(getattr(config, key, None) for key in _LOGIT_POSTPROCESSING)

    def pad(self, token_ids: list[np.ndarray]):
        """Right-padded ``input_ids`` and ``attention_mask``: real tokens keep positions 0..n-1."""
        import torch

        width = max(len(ids) for ids in token_ids)
        ids = torch.zeros((len(token_ids), width), dtype=torch.long)
        mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, sample in enumerate(token_ids):
            ids[row, :len(sample)] = torch.from_numpy(sample.astype(np.int64))
            mask[row, :len(sample)] = 1
        return ids.to(self.device), mask.to(self.device)

    def run(self, token_ids: list[np.ndarray], split: str, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ids, mask = self.pad(token_ids)
        lengths = mask.sum(dim=1)
        rows = torch.arange(len(token_ids), device=self.device)
        adapter, traced = self.adapter, self.traced
        resid: list = []
        mlp_in: list = []
        final: list = []
        head_path = split in ("wmdp", "wmdp_cloze") and self.head_only
        with torch.inference_mode():
            with traced.trace(input_ids=ids, attention_mask=mask) as tracer:
                resid.append(adapter.block(0, traced).input.save())
                for layer in range(adapter.num_layers):
                    mlp_in.append(adapter.mlp(layer, traced).input.save())
                    resid.append(adapter.block(layer, traced).output.save())
                if head_path:
                    final.append(adapter.final_norm(traced).output.save())
                    tracer.stop()  # the unembedding runs below, on the positions scored only
                elif split == "wmdp":
                    logits = traced.output.logits
                    final.append(logits[rows, lengths - 1][:, self.letter_ids].float().save())
                elif split == "wmdp_cloze":
                    final.append(self._cloze_logprob(lambda r, p: traced.output.logits[r, p], ids, extra).save())
                else:
                    tracer.stop()  # forget / retain need no logits: skip the final norm and unembedding
            if head_path:
                final[0] = self._head_scores(final[0], split, rows, lengths, ids, extra)
            lengths_list = [int(n) for n in lengths.cpu()]
            out = {"resid": self._store(self._gather(resid, lengths_list), "resid"),
                   "mlp_in": self._store(self._gather(mlp_in, lengths_list), "mlp_in"),
                   "last": self._store(torch.stack([h[rows, lengths - 1] for h in resid]).to(self.dtype), "last")}
        if split == "wmdp":
            out["final_letter_logits"] = final[0].cpu().numpy().astype(np.float32)
        elif split == "wmdp_cloze":
            out["final_cloze_logprob"] = final[0].cpu().numpy().astype(np.float32)
        return out

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.store_dtype)

    def _gather(self, states: list, lengths: list[int]):
        """(layers, real tokens, hidden) in the storage dtype: drop padding and cast in one copy."""
        import torch

        hidden = states[0].shape[-1]
        out = torch.empty((len(states), sum(lengths), hidden), dtype=self.dtype, device=states[0].device)
        for layer, state in enumerate(states):
            start = 0
            for row, length in enumerate(lengths):  # right padding: real tokens come first
                out[layer, start:start + length].copy_(state[row, :length])
                start += length
        return out

    def _head_scores(self, normed, split: str, rows, lengths, ids, extra: dict[str, np.ndarray]):
        """The model's own letter logits or cloze log-probs from its final-norm output.

        Applies the unembedding to the scored positions only (what HF's ``logits_to_keep`` does):
        the full (batch, tokens, vocab) logits of a bare forward are never built.
        """
        head = self.adapter.unembed()
        if split == "wmdp":
            return head(normed[rows, lengths - 1])[:, self.letter_ids].float()
        return self._cloze_logprob(lambda r, p: head(normed[r, p]), ids, extra)

    def _cloze_logprob(self, logits_at: Callable, ids, extra: dict[str, np.ndarray]):
        """Mean log-prob of each continuation, from the model's own logits (SCHEMA.md).

        ``logits_at(rows, positions)`` gives the model's logits at those (row, position) pairs.
        """
        import torch

        starts = torch.as_tensor(extra["cont_start"], device=ids.device).long()
        ends = torch.as_tensor(extra["cont_end"], device=ids.device).long()
        counts = ends - starts
        row = torch.repeat_interleave(torch.arange(len(starts), device=ids.device), counts)
        within = torch.arange(int(counts.sum()), device=ids.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        target_pos = torch.repeat_interleave(starts, counts) + within
        logprobs = torch.log_softmax(logits_at(row, target_pos - 1).float(), dim=-1)
        picked = logprobs.gather(1, ids[row, target_pos].unsqueeze(1)).squeeze(1)
        return torch.zeros(len(starts), device=ids.device).index_add_(0, row, picked) / counts

    def _store(self, stored, name: str) -> np.ndarray:
        """Check a cast tensor: values the storage dtype cannot hold are an error, never stored as inf."""
        import torch

        low, high = torch.aminmax(stored)  # 10x faster than isfinite on float16; NaN propagates
        if not (torch.isfinite(low) and torch.isfinite(high)):
            if self.store_dtype == "float16" and not (torch.isnan(low) or torch.isnan(high)):
                raise UserError(
                    f"{name} activations exceed float16's range (65504); capture again with --dtype float32 "
                    "(add --overwrite to replace this partial cache)"
                )
            raise UserError(f"the model produced non-finite {name} activations (NaN or inf): check the model")
        return stored.cpu().numpy()


# --- one split ---------------------------------------------------------------------------------

def dynamic_arrays(split: str, dtype: str) -> dict[str, Dynamic]:
    arrays = {"resid": Dynamic(("layer", "token", "hidden"), dtype),
              "mlp_in": Dynamic(("mlp_layer", "token", "hidden"), dtype),
              "last": Dynamic(("layer", "sample", "hidden"), dtype)}
    if split == "wmdp":
        arrays["final_letter_logits"] = Dynamic(("sample", "choice"), "float32")
    if split == "wmdp_cloze":
        arrays["final_cloze_logprob"] = Dynamic(("sample",), "float32")
    return arrays


def static_arrays(inputs: SplitInputs, layout: SplitLayout, wmdp_extras: dict[str, Any]) -> dict:
    """Arrays known before any forward pass, with their dims."""
    input_ids = np.zeros(layout.n_tokens, dtype=np.int32)
    for start, ids in zip(layout.offsets, inputs.token_ids):
        input_ids[start:start + len(ids)] = ids
    arrays: dict[str, tuple[tuple[str, ...], np.ndarray]] = {"input_ids": (("token",), input_ids)}
    arrays.update({name: (("token",), values) for name, values in layout.token_arrays().items()})
    arrays["sample_offset"] = (("sample",), layout.offsets.astype(np.int64))
    arrays["sample_length"] = (("sample",), layout.lengths.astype(np.int32))
    arrays.update({name: (("sample",), values) for name, values in inputs.sample_arrays.items()})
    if inputs.split == "wmdp":
        arrays.update(wmdp_extras)
    return arrays


def wmdp_static(model, tokenizer, adapter) -> tuple[list[int], dict]:
    """Letter token ids, their unembedding rows and the final norm (for lenses without the model)."""
    from unlearn_lens.prompts import letter_token_ids

    letters = letter_token_ids(tokenizer)
    norm = adapter.final_norm_description()
    unembed = adapter.unembed().weight.detach().float().cpu().numpy()[letters]
    bias = norm["bias"] if norm["bias"] is not None else np.zeros_like(norm["weight"])
    return letters, {
        "letter_token_ids": (("choice",), np.asarray(letters, dtype=np.int32)),
        "letter_unembed": (("choice", "hidden"), unembed.astype(np.float32)),
        "final_norm_weight": (("hidden",), np.asarray(norm["weight"], dtype=np.float32)),
        "final_norm_bias": (("hidden",), np.asarray(bias, dtype=np.float32)),
    }


def batches(layout: SplitLayout, block: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Consecutive sample ranges of one block (consecutive, so tokens stay contiguous)."""
    first, stop = layout.block_sample_range(block)
    for start in range(first, stop, batch_size):
        yield start, min(start + batch_size, stop)


def capture_split(runner: BatchRunner, writer: SplitWriter, inputs: SplitInputs, settings: CaptureSettings,
                  on_batch: Callable[[], None]) -> None:
    """Run every pending block of this process's shard and hand the results to the writer."""
    layout = writer.layout
    for block in writer.pending_blocks(*settings.shard):
        for start, stop in batches(layout, block, settings.batch_size):
            extra = {name: values[start:stop] for name, values in inputs.sample_arrays.items()}
            result = runner.run(inputs.token_ids[start:stop], inputs.split, extra)
            writer.submit(block, result)
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


# --- the whole capture ---------------------------------------------------------------------------

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
    from unlearn_lens.capture_provenance import provenance
    from unlearn_lens.loading import load_model

    from cache_store.store import refuse_read_only

    refuse_read_only(out)  # before loading any model
    if settings.dtype not in STORE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)}")
    if settings.batch_size <= 0 or settings.block_samples <= 0:
        raise UserError("--batch-size and --block-samples must be positive")
    data_hash = datasets.data_hash(data_dir)
    model, tokenizer = load_model(model_spec, revision=revision, dtype=settings.model_dtype,
                                  device=settings.device, trust_remote_code=trust_remote_code)
    adapter = ArchitectureAdapter(model, arch_spec)
    prov = provenance(model_spec, revision, model, tokenizer, adapter, data_hash=data_hash,
                      max_length=settings.max_length, dtype=settings.dtype)
    inputs = build_inputs(tokenizer, data_dir, list(settings.splits), settings.max_samples, settings.max_length)
    writer = CacheWriter(out, prov, overwrite=settings.overwrite)
    letters, wmdp_extras = wmdp_static(model, tokenizer, adapter) if "wmdp" in inputs else (None, {})
    runner = BatchRunner(model, adapter, settings.dtype, letters)
    sizes_common = {"layer": adapter.num_layers + 1, "mlp_layer": adapter.num_layers,
                    "hidden": prov["hidden_size"], "choice": 4}
    itemsize = np.dtype(settings.dtype).itemsize
    kill_hook = _kill_hook()
    states: dict[str, str] = {}
    for split, split_inputs in inputs.items():
        lengths = split_inputs.lengths
        chunk = settings.token_chunk or choose_token_chunk(prov["hidden_size"], itemsize, lengths,
                                                           settings.block_samples)
        layout = SplitLayout(lengths, settings.block_samples, chunk)
        sizes = {**sizes_common, "token": layout.n_tokens, "sample": layout.n_samples}
        split_writer = writer.open_split(
            split, layout, sizes=sizes, static=static_arrays(split_inputs, layout, wmdp_extras),
            dynamic=dynamic_arrays(split, settings.dtype),
            attrs={"max_samples": settings.max_samples,
                   "content_fingerprint": content_fingerprint(np.concatenate(split_inputs.token_ids))},
        )
        if split_writer.complete:
            states[split] = "already complete"
            continue
        pending = split_writer.pending_blocks(*settings.shard)
        total = sum(len(range(*layout.block_sample_range(b), settings.batch_size)) for b in pending)
        bar = tqdm(total=total, desc=f"capture {split}", unit="batch", disable=not settings.progress,
                   file=sys.stderr)
        split_writer.start()
        try:
            capture_split(runner, split_writer, split_inputs, settings,
                          lambda: (bar.update(1), kill_hook(split_writer)))
        finally:
            bar.close()
            split_writer.close()
        states[split] = "complete" if split_writer.finalize_if_done() else "shard done"
    return states


@dataclass(frozen=True)
class CaptureRun:
    """One model's capture (the `capture` command's flags): the model, the data, where, and how."""

    model: ModelRef
    data: str
    out: str  # the cache: a directory or fsspec URL
    settings: CaptureSettings = field(default_factory=CaptureSettings)


def run_capture(run: CaptureRun) -> dict[str, str]:
    """``capture`` with the model reference of ``run``; returns each split's state."""
    return capture(run.model.spec, run.data, run.out, run.settings, revision=run.model.revision,
                   arch_spec=run.model.arch_spec, trust_remote_code=run.model.trust_remote_code)
