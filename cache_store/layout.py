"""Where every sample's tokens sit on the flat token axis of a split (pure numpy, no I/O).

Samples are grouped into *blocks* of ``block_samples`` consecutive samples. A block is the unit
of work, of resumption and of sharding, so its writes must never share a Zarr chunk with
another block's: each block therefore starts on a token-chunk boundary and its last chunk is
filled with *slack* (zeros, ``attention_mask`` 0) up to the next boundary. Sample-indexed arrays
are chunked by ``block_samples``, so they align too. Slack is dropped again by
``cache_store.open_cache``; it costs almost nothing on disk (zeros compress away) and never more
than one chunk per block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from unlearn_lens.core.errors import UserError

#: Target size of one (token chunk x hidden) chunk of activations, uncompressed.
TARGET_CHUNK_BYTES = 4 * 2**20
MIN_TOKEN_CHUNK = 16


def choose_token_chunk(hidden: int, itemsize: int, lengths: np.ndarray, block_samples: int) -> int:
    """A power-of-two token chunk of at most ~4 MiB per layer, no longer than a typical block.

    Capping by the mean block length keeps slack (at most one chunk per block) small.
    """
    by_bytes = max(1, TARGET_CHUNK_BYTES // max(1, hidden * itemsize))
    mean_block = max(1, int(np.mean(lengths)) * block_samples) if len(lengths) else 1
    limit = max(MIN_TOKEN_CHUNK, min(by_bytes, mean_block))
    return int(2 ** int(np.floor(np.log2(limit))))


@dataclass(frozen=True)
class SplitLayout:
    """Positions of all samples of a split on the (slack-including) on-disk token axis."""

    lengths: np.ndarray  # (sample,) real tokens of each sample
    block_samples: int
    token_chunk: int
    offsets: np.ndarray = field(init=False)  # (sample,) on-disk index of each sample's first token
    block_starts: np.ndarray = field(init=False)  # (block + 1,) on-disk token range of each block

    def __post_init__(self) -> None:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        if lengths.ndim != 1 or len(lengths) == 0:
            raise UserError("a split needs at least one sample")
        if (lengths <= 0).any():
            raise UserError(f"sample {int(np.argmin(lengths))} has no tokens after tokenisation")
        if self.block_samples <= 0 or self.token_chunk <= 0:
            raise ValueError("block_samples and token_chunk must be positive")
        n_blocks = -(-len(lengths) // self.block_samples)
        offsets = np.empty(len(lengths), dtype=np.int64)
        starts = np.zeros(n_blocks + 1, dtype=np.int64)
        for block in range(n_blocks):
            first, stop = block * self.block_samples, min((block + 1) * self.block_samples, len(lengths))
            block_lengths = lengths[first:stop]
            offsets[first:stop] = starts[block] + np.concatenate([[0], np.cumsum(block_lengths)[:-1]])
            used = int(block_lengths.sum())
            starts[block + 1] = starts[block] + -(-used // self.token_chunk) * self.token_chunk
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "block_starts", starts)

    @property
    def n_samples(self) -> int:
        return len(self.lengths)

    @property
    def n_blocks(self) -> int:
        return len(self.block_starts) - 1

    @property
    def n_tokens(self) -> int:
        """Length of the on-disk token axis, slack included."""
        return int(self.block_starts[-1])

    @property
    def n_real_tokens(self) -> int:
        return int(self.lengths.sum())

    def block_sample_range(self, block: int) -> tuple[int, int]:
        return block * self.block_samples, min((block + 1) * self.block_samples, self.n_samples)

    def block_token_range(self, block: int) -> tuple[int, int]:
        return int(self.block_starts[block]), int(self.block_starts[block + 1])

    def token_arrays(self) -> dict[str, np.ndarray]:
        """Per-token ``attention_mask``, ``token_sample`` and ``token_position`` (slack: 0, -1, -1)."""
        mask = np.zeros(self.n_tokens, dtype=np.int8)
        sample = np.full(self.n_tokens, -1, dtype=np.int32)
        position = np.full(self.n_tokens, -1, dtype=np.int32)
        for index, (start, length) in enumerate(zip(self.offsets, self.lengths)):
            mask[start:start + length] = 1
            sample[start:start + length] = index
            position[start:start + length] = np.arange(length, dtype=np.int32)
        return {"attention_mask": mask, "token_sample": sample, "token_position": position}

    def real_token_ranges(self) -> list[tuple[int, int]]:
        """On-disk ``[start, stop)`` of the real tokens of each block (contiguous inside a block)."""
        ranges = []
        for block in range(self.n_blocks):
            first, stop = self.block_sample_range(block)
            start = int(self.offsets[first])
            ranges.append((start, start + int(self.lengths[first:stop].sum())))
        return ranges

    def shard_blocks(self, shard: int, n_shards: int) -> range:
        """Blocks of shard ``shard`` (1-based) of ``n_shards``: a contiguous run, disjoint from the others'."""
        if not 1 <= shard <= n_shards:
            raise UserError(f"--shard {shard}/{n_shards}: K must be between 1 and N")
        return range(self.n_blocks * (shard - 1) // n_shards, self.n_blocks * shard // n_shards)

    def fingerprint(self) -> str:
        """Identifies the layout (lengths, block and chunk sizes); a resumed capture must match it."""
        digest = hashlib.sha256(self.lengths.astype("<i8").tobytes())
        digest.update(f"{self.block_samples}/{self.token_chunk}".encode())
        return digest.hexdigest()[:16]
