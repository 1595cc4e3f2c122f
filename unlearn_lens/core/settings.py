"""Small settings every step shares: which model (a reference), how to compute, and their defaults.

Each step's settings dataclass (``EvalSettings``, ``RelearnSettings``, ``LipschitzSettings``...)
composes these instead of repeating spec / revision / device / dtype / batch size, and every
command's flags (``unlearn_lens.options``) take their defaults from the constants here, so a
default is written once. Standard library only, like the rest of the core.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Tokens per text (truncated) of every command that reads whole texts.
DEFAULT_MAX_LENGTH = 512
#: Tokens per text of the diagnostics that differentiate or train through the model (lipschitz,
#: tuned-lens): shorter, because they cost far more per token than a forward pass.
SHORT_MAX_LENGTH = 128
#: Texts or prompts per forward pass.
DEFAULT_BATCH_SIZE = 8
#: Texts per training step of the commands that fine-tune (unlearn, relearn).
TRAIN_BATCH_SIZE = 4
#: Torch device of every model-side command (unlearn's is accelerate's "auto").
DEFAULT_DEVICE = "cpu"
#: Model compute dtypes; "auto" is float32 on CPU and bfloat16 on GPU.
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_DTYPE = "auto"
#: Texts (questions) per split a capture reads by default (the first N), also the pipeline's.
CAPTURE_MAX_SAMPLES = 500
#: Storage dtypes of an activation cache; float16 (the default) halves it.
CACHE_DTYPES = ("float16", "float32")
#: Chunk codecs of an activation cache: zstd level 1 (saves ~9 % on float16, costs writer CPU) or
#: none (the crc32c checksum only); both end every chunk with its crc32c.
CACHE_CODECS = ("zstd1", "none")
#: Output root of the commands that default one (pipeline, report, infer's sweeps).
DEFAULT_OUTDIR = "outputs"
#: Seed of every command's random choices.
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: a spec (hub id, HF directory or .gguf), its hub revision, an
    architecture description for unknown families, and whether its own code may run."""

    spec: str
    revision: str | None = None
    arch_spec: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Compute:
    """How a model runs: torch device, compute dtype and texts per forward pass."""

    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    batch_size: int = DEFAULT_BATCH_SIZE
