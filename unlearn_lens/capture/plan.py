"""The size and time of a capture before any weight is loaded (`capture --plan`, and the free-space check).

From the model's config (layers, hidden size, MLP width) and the tokenised inputs alone, it counts
per split and array the tokens and bytes the cache will hold, compares them with the free space at
``--out`` and estimates whether the forward pass or the writing will bound the capture on the
device. A capture whose cache would not fit refuses to start, naming flags that would make it fit.

The rates below are stated assumptions, not measurements of this machine: the forward rate of
the device kind, the writer's per-thread ingestion (measured by
``benchmarks/bench_capture_scale.py``, recorded in ``benchmarks/RESULTS.md``) and a local disk's
sequential write bandwidth.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from unlearn_lens.capture.inputs import SplitInputs
from unlearn_lens.capture.selection import Kept, Selection, resolve, sample_positions
from unlearn_lens.core.errors import UserError

#: Stored bytes per raw byte of activations (zstd-1 on float16 measured on SmolLM2, RESULTS.md:
#: 1056 of 1152 bytes per token and layer; tiny random models give 0.89-0.95). An upper bound for the
#: WMDP splits, whose shared prompt prefixes give identical states that zstd compresses further.
STORED_SHARE = {("zstd1", "float16"): 0.92, ("zstd1", "float32"): 0.92, ("none", "float16"): 1.0,
                ("none", "float32"): 1.0}
#: Stored bytes per token of the static token arrays (input_ids, attention_mask, token_sample,
#: token_position: 13 raw bytes; with zstd-1 only the token ids stay large).
STATIC_BYTES_PER_TOKEN = {"zstd1": 3.0, "none": 13.0}
#: Bytes of each array's metadata document (zarr.json).
METADATA_BYTES_PER_ARRAY = 650
#: Assumed forward rates (FLOP/s): an H100 at ~40 % of its 989 TFLOP/s bf16 peak; a CPU core.
GPU_FLOPS = 4.0e14
CPU_FLOPS_PER_CORE = 2.0e10
#: The writer's ingestion per thread, nothing stored (bytes/s of activations; bench_capture_scale.py on
#: a loaded 2-core VM, benchmarks/RESULTS.md: 0.29 GB/s with zstd-1, 3.4 GB/s without; an idle core
#: does about 0.7 GB/s of zstd-1).
WRITER_BYTES_PER_THREAD = {"zstd1": 0.3e9, "none": 3.4e9}
#: Assumed sequential write bandwidth: a local NVMe disk (low end of 2-7 GB/s); an object store over
#: one node's network (1-3 GB/s).
DISK_BYTES_PER_S = {"local": 2.0e9, "remote": 1.0e9}
#: Reductions tried, least first, when a cache would not fit (their flags are suggested).
FITTING_SELECTIONS = (("every:2", None, None), (None, 256, None), (None, 128, None), ("every:2", 128, None),
                      (None, 64, None), ("every:4", 64, None), ("every:4", 32, ("resid",)),
                      ("every:8", 16, ("resid",)))


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its config (no weights)."""

    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    gated: bool  # SwiGLU-style MLP (three matrices) rather than two

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs per token: 2 x the block matrices' parameters (attention's 4 d^2 and the MLP)."""
        per_block = 4 * self.hidden ** 2 + (3 if self.gated else 2) * self.hidden * self.intermediate
        return 2.0 * self.num_layers * per_block


def model_shape(config: Any) -> ModelShape:
    """Layers, widths and vocabulary from an HF config (GPT-NeoX, Llama-style or GPT-2 names)."""
    hidden = int(config.hidden_size)
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    gated = getattr(config, "model_type", "") not in ("gpt_neox", "gpt2")  # Llama-style: gate, up, down
    return ModelShape(int(config.num_hidden_layers), hidden, int(intermediate), int(config.vocab_size), gated)


@dataclass
class SplitPlan:
    """One split: samples, real and kept tokens, and the bytes each array will take on disk."""

    split: str
    samples: int
    tokens: int
    kept_tokens: int
    bytes: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.bytes.values()))


@dataclass
class CapturePlan:
    """A whole capture's plan: per split sizes, free space at the destination, and the expected bound."""

    splits: list[SplitPlan]
    shape: ModelShape
    kept: Kept
    dtype: str
    codec: str
    threads: int
    device: str
    out: str
    free: int | None  # bytes free at --out (None: unknown, an object store)
    present: int = 0  # bytes already at --out (a cache being resumed or replaced)

    @property
    def total(self) -> float:
        return float(sum(s.total for s in self.splits))

    @property
    def needed(self) -> float:
        return max(0.0, self.total - self.present)

    @property
    def fits(self) -> bool:
        return self.free is None or self.needed <= self.free

    @property
    def activation_bytes(self) -> float:
        """Raw (uncompressed) bytes of activations handed to the writer."""
        share = STORED_SHARE[(self.codec, self.dtype)]
        return sum(b for s in self.splits for name, b in s.bytes.items() if name in ("resid", "mlp_in", "last")) / share

    def seconds(self) -> dict[str, float]:
        """Estimated seconds of the forward, the writer threads and the disk (the largest bounds the capture)."""
        tokens = sum(s.tokens for s in self.splits)
        flops = GPU_FLOPS if not self.device.startswith("cpu") else CPU_FLOPS_PER_CORE * (os.cpu_count() or 1)
        return {"forward": tokens * self.shape.flops_per_token / flops,
                "writer": self.activation_bytes / (WRITER_BYTES_PER_THREAD[self.codec] * self.threads),
                "disk": self.total / disk_rate(self.out)}

    def bound(self) -> str:
        times = self.seconds()
        return max(times, key=times.get)

    def lines(self) -> list[str]:
        """The printed plan."""
        s = self.shape
        out = [f"plan: {s.num_layers} layers x {s.hidden} hidden, {self.dtype}, codec {self.codec}, "
               f"{self.threads} writer thread(s); kept: resid layers {_layers(self.kept.resid_layers)}, "
               f"mlp_in layers {_layers(self.kept.mlp_layers)}, tokens "
               f"{'all' if self.kept.token_sample is None else f'{self.kept.token_sample} per text'}, "
               f"arrays {','.join(self.kept.variables)} + last"]
        names = ["resid", "mlp_in", "last", "other"]
        out.append(f"{'split':12s}{'samples':>9s}{'tokens':>11s}{'kept':>11s}" + "".join(f"{n:>11s}" for n in names)
                   + f"{'total':>11s}")
        for p in self.splits:
            other = p.total - sum(p.bytes.get(n, 0.0) for n in names[:3])
            cells = [p.bytes.get(n, 0.0) for n in names[:3]] + [other]
            out.append(f"{p.split:12s}{p.samples:9d}{p.tokens:11d}{p.kept_tokens:11d}"
                       + "".join(f"{size(b):>11s}" for b in cells) + f"{size(p.total):>11s}")
        free = "unknown (object store)" if self.free is None else size(self.free)
        resumed = f" ({size(self.present)} already there)" if self.present else ""
        out.append(f"on disk: {size(self.total)}{resumed}; free at {self.out}: {free}; "
                   + ("fits" if self.fits else "does NOT fit"))
        times = self.seconds()
        rate = "an H100-class GPU at 400 TFLOP/s" if not self.device.startswith("cpu") else \
            f"{os.cpu_count() or 1} CPU cores at {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s each"
        out.append(f"time on {self.device}: forward ~{duration(times['forward'])} "
                   f"({s.flops_per_token / 1e9:.1f} GFLOP/token, {rate}); writer ~{duration(times['writer'])} "
                   f"({self.threads} thread(s) x {WRITER_BYTES_PER_THREAD[self.codec] / 1e9:.2f} GB/s); "
                   f"disk ~{duration(times['disk'])} (assumed {disk_rate(self.out) / 1e9:.0f} GB/s); "
                   f"bound: {self.bound()}")
        return out


def disk_rate(out: str) -> float:
    """The assumed write bandwidth of the destination (local disk or a URL)."""
    return DISK_BYTES_PER_S["remote" if "://" in out and not out.startswith("file://") else "local"]


def _layers(layers: tuple[int, ...]) -> str:
    if not layers:
        return "none"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def split_plan(inputs: SplitInputs, shape: ModelShape, kept: Kept, dtype: str, codec: str) -> SplitPlan:
    """Tokens and bytes on disk of one split under ``kept``."""
    positions = sample_positions(inputs.split, inputs.lengths, kept.token_sample, kept.seed, inputs.sample_arrays)
    kept_tokens = int(inputs.lengths.sum()) if positions is None else int(sum(len(p) for p in positions))
    itemsize = np.dtype(dtype).itemsize
    share = STORED_SHARE[(codec, dtype)]
    n = len(inputs.token_ids)
    per_layer = shape.hidden * itemsize * share
    bytes_ = {}
    if "resid" in kept.variables:
        bytes_["resid"] = len(kept.resid_layers) * kept_tokens * per_layer
    if "mlp_in" in kept.variables:
        bytes_["mlp_in"] = len(kept.mlp_layers) * kept_tokens * per_layer
    bytes_["last"] = len(kept.resid_layers) * n * per_layer
    arrays = len(bytes_) + 7 + len(inputs.sample_arrays)  # 6 token and sample arrays, block_done
    other = kept_tokens * STATIC_BYTES_PER_TOKEN[codec] + n * 16
    if positions is not None:
        arrays += 2  # text_input_ids, text_length
        other += int(inputs.lengths.sum()) * 4 * (0.6 if codec == "zstd1" else 1.0)
    if inputs.split in ("wmdp", "wmdp_cloze"):
        arrays += 1 if inputs.split == "wmdp_cloze" else 5  # logits; letters, norm, letter logits
        other += n * 4 * 4 + (4 * shape.hidden * 4 * 2 if inputs.split == "wmdp" else 0)
    bytes_["other"] = other + arrays * METADATA_BYTES_PER_ARRAY
    return SplitPlan(inputs.split, n, int(inputs.lengths.sum()), kept_tokens, bytes_)


def free_bytes(out: str) -> int | None:
    """Free bytes on the filesystem that will hold ``out`` (None for an object store or URL)."""
    from cache_store.store import local_path

    path = local_path(out)
    if path is None:
        return None
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return int(shutil.disk_usage(path).free)


def present_bytes(out: str) -> int:
    """Bytes already in a local cache at ``out`` (reused by a resumed capture, freed by --overwrite)."""
    from cache_store.store import exists, local_path

    path = local_path(out)
    if path is None or not exists(out):
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def plan_capture(shape: ModelShape, inputs: Mapping[str, SplitInputs], selection: Selection, *, dtype: str,
                 codec: str, threads: int, device: str, out: str) -> CapturePlan:
    """The plan of a capture of ``inputs`` with ``selection`` into ``out``."""
    kept = resolve(selection, shape.num_layers)
    splits = [split_plan(split_inputs, shape, kept, dtype, codec) for split_inputs in inputs.values()]
    return CapturePlan(splits, shape, kept, dtype, codec, threads, device, str(out), free_bytes(str(out)),
                       present_bytes(str(out)))


def fitting_flags(plan: CapturePlan, inputs: Mapping[str, SplitInputs], selection: Selection,
                  most: int = 2) -> list[tuple[str, float]]:
    """Up to ``most`` alternative flag sets (least reduction first) whose cache fits, with their size."""
    found = []
    for layers, k, variables in FITTING_SELECTIONS:
        other = replace(selection, layers=layers or selection.layers, token_sample=k or selection.token_sample,
                        variables=variables or selection.variables)
        candidate = plan_capture(plan.shape, inputs, other, dtype=plan.dtype, codec=plan.codec, threads=plan.threads,
                                 device=plan.device, out=plan.out)
        if candidate.fits and other != selection:
            found.append((other.flags(), candidate.total))
            if len(found) == most:
                break
    return found


def refuse_if_too_big(plan: CapturePlan, inputs: Mapping[str, SplitInputs], selection: Selection) -> None:
    """One-line ``UserError`` before any model loads when the cache would not fit the free space."""
    if plan.fits:
        return
    fixes = fitting_flags(plan, inputs, selection)
    hint = ("; these would fit: " + "; ".join(f"{flags} ({size(total)})" for flags, total in fixes)) if fixes else \
        "; even the smallest selection does not: free space or capture fewer --max-samples"
    raise UserError(f"the cache would take {size(plan.needed)} more at {plan.out} but only {size(plan.free)} are "
                    f"free (see `unlearn-lens capture ... --plan`){hint}")
