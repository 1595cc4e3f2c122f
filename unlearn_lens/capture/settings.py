"""The settings of one capture (the `capture` command's flags) and their defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from unlearn_lens.capture.selection import Selection
from unlearn_lens.core.settings import (CACHE_CODECS, CACHE_DTYPES, CAPTURE_MAX_SAMPLES, DEFAULT_BATCH_SIZE,
                                        DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MAX_LENGTH, ModelRef)

STORE_DTYPES = CACHE_DTYPES
DEFAULT_BLOCK_SAMPLES = 32
#: Writer threads on a GPU node at most (one core stays with the capture loop).
MAX_WRITER_THREADS = 16


def default_writer_threads(device: str) -> int:
    """Writer threads per split: on a CPU node one (the forward has the cores, the writer runs at a
    lower priority); on a GPU node every core but the capture loop's, up to ``MAX_WRITER_THREADS``."""
    if str(device).startswith("cpu"):
        return 1
    return max(1, min(MAX_WRITER_THREADS, (os.cpu_count() or 2) - 1))


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
    selection: Selection = field(default_factory=Selection)  # --layers, --token-sample, --variables
    codec: str = CACHE_CODECS[0]
    writer_threads: int | None = None  # None: default_writer_threads(device)

    @property
    def threads(self) -> int:
        return self.writer_threads or default_writer_threads(self.device)


@dataclass(frozen=True)
class CaptureRun:
    """One model's capture (the `capture` command's flags): the model, the data, where, and how."""

    model: ModelRef
    data: str
    out: str  # the cache: a directory or fsspec URL
    settings: CaptureSettings = field(default_factory=CaptureSettings)
