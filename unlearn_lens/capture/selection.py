"""What a capture keeps: which layers, which token positions, which token-level arrays (issue 24).

A full capture records the residual stream at every layer 0..L, every MLP input 0..L-1 and every
real token: 532 KB per token for GPT-NeoX 6.9B. ``--layers``, ``--token-sample`` and
``--variables`` cut that down on purpose, and the cache records what was kept (the ``selection``
attribute of each split, the ``layer`` / ``mlp_layer`` coordinates, the sampled positions in
``token_position``), so that every reader works on the layers and tokens that are there:

- ``--layers SPEC``: residual layers ``0,8,16``, ranges ``0-8``, ``every:K`` (0, K, 2K, ...),
  combined with commas; the final layer L is always kept (the logit lens scores it and checks it
  against the model's own output); MLP inputs are kept at the chosen layers below L;
- ``--token-sample K``: K positions per text, drawn with a seed from (seed, split, text index), so
  the same text gets the same positions in every model and whatever ``--max-samples`` reads; the
  last token is always kept, and for ``wmdp_cloze`` every position the cloze score reads
  (``cont_start - 1`` to ``cont_end - 1``); ``last`` (one state per text), the WMDP logits and the
  token ids stay complete;
- ``--variables``: which token-level arrays (``resid``, ``mlp_in``); ``last`` is always recorded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_at_least
from unlearn_lens.core.settings import DEFAULT_SEED

#: Token-level arrays a capture can record (``last`` is always recorded).
TOKEN_VARIABLES = ("resid", "mlp_in")


@dataclass(frozen=True)
class Selection:
    """What to keep, as given on the command line (``None``: everything)."""

    layers: str | None = None
    token_sample: int | None = None
    variables: tuple[str, ...] = TOKEN_VARIABLES
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        check_at_least("--token-sample", self.token_sample, 1, "leave it out to keep every token")
        unknown = [v for v in self.variables if v not in TOKEN_VARIABLES]
        if unknown or not self.variables:
            raise UserError(f"--variables {','.join(self.variables) or '(none)'}: choose among "
                            f"{', '.join(TOKEN_VARIABLES)}")

    def flags(self) -> str:
        """The command-line flags that give this selection ('' for a full capture)."""
        parts = [f"--layers {self.layers}"] if self.layers else []
        parts += [f"--token-sample {self.token_sample}"] if self.token_sample else []
        parts += [f"--variables {','.join(self.variables)}"] if tuple(self.variables) != TOKEN_VARIABLES else []
        return " ".join(parts)


def parse_variables(value: str) -> tuple[str, ...]:
    """``resid,mlp_in`` -> the token-level arrays to record, in the cache's order."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in TOKEN_VARIABLES]
    if unknown or not names:
        raise UserError(f"--variables {value!r}: choose among {', '.join(TOKEN_VARIABLES)}")
    return tuple(v for v in TOKEN_VARIABLES if v in names)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Residual layers named by ``spec`` (items ``N``, ``A-B``, ``every:K``, ``all``), sorted, in 0..L."""
    chosen: set[int] = set()
    for item in (part.strip() for part in spec.split(",")):
        try:
            if not item:
                continue
            if item == "all":
                chosen.update(range(num_layers + 1))
            elif item.startswith("every:"):
                step = int(item[len("every:"):])
                if step < 1:
                    raise ValueError
                chosen.update(range(0, num_layers + 1, step))
            elif "-" in item:
                low, high = (int(x) for x in item.split("-"))
                if low > high:
                    raise ValueError
                chosen.update(range(low, high + 1))
            else:
                chosen.add(int(item))
        except ValueError:
            raise UserError(f"--layers {spec!r}: {item!r} is not a layer, a range A-B or every:K") from None
    beyond = sorted(layer for layer in chosen if not 0 <= layer <= num_layers)
    if beyond:
        raise UserError(f"--layers {spec!r}: layer {beyond[0]} is outside this model's residual layers 0..{num_layers}")
    if not chosen:
        raise UserError(f"--layers {spec!r} names no layer")
    return sorted(chosen)


@dataclass(frozen=True)
class Kept:
    """A selection resolved for one model: the layers and arrays recorded, the token sampling."""

    num_layers: int
    resid_layers: tuple[int, ...]
    mlp_layers: tuple[int, ...]
    variables: tuple[str, ...]
    token_sample: int | None
    seed: int

    @property
    def full(self) -> bool:
        return (self.resid_layers == tuple(range(self.num_layers + 1)) and self.variables == TOKEN_VARIABLES
                and self.token_sample is None)

    def attrs(self) -> dict[str, Any] | None:
        """The split attribute ``selection`` (None for a full capture: its caches look as before)."""
        if self.full:
            return None
        return {"resid_layers": list(self.resid_layers), "mlp_layers": list(self.mlp_layers),
                "variables": list(self.variables), "token_sample": self.token_sample,
                "token_sample_seed": self.seed if self.token_sample else None}


def resolve(selection: Selection, num_layers: int) -> Kept:
    """The layers and arrays ``selection`` keeps of a model with ``num_layers`` blocks."""
    if selection.layers is None:
        layers = list(range(num_layers + 1))
    else:
        layers = sorted(set(parse_layers(selection.layers, num_layers)) | {num_layers})
    mlp_layers = tuple(layer for layer in layers if layer < num_layers)
    if "mlp_in" in selection.variables and not mlp_layers:
        raise UserError(f"--layers {selection.layers!r} keeps no MLP input (layers 0..{num_layers - 1}); "
                        "name one, or record --variables resid")
    return Kept(num_layers, tuple(layers), mlp_layers, tuple(selection.variables), selection.token_sample,
                selection.seed)


def _sample_one(length: int, k: int, forced: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keep = np.zeros(length, dtype=bool)
    keep[forced] = True
    keep[length - 1] = True
    extra = k - int(keep.sum())
    if extra > 0:
        others = np.flatnonzero(~keep)
        keep[rng.choice(others, size=min(extra, len(others)), replace=False)] = True
    return np.flatnonzero(keep).astype(np.int32)


def sample_positions(split: str, lengths: np.ndarray, k: int | None, seed: int,
                     sample_arrays: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray] | None:
    """Sorted positions kept in each text (None: every position).

    K positions drawn from each text's own generator (seed, split, index), the last token
    always among them, and for ``wmdp_cloze`` every scored position on top.
    """
    if k is None:
        return None
    sample_arrays = sample_arrays or {}
    split_code = zlib.crc32(split.encode())
    positions = []
    for index, length in enumerate(np.asarray(lengths, dtype=np.int64)):
        forced = np.zeros(0, dtype=np.int64)
        if "cont_start" in sample_arrays:
            forced = np.arange(int(sample_arrays["cont_start"][index]) - 1, int(sample_arrays["cont_end"][index]))
        rng = np.random.default_rng([seed, split_code, index])
        positions.append(_sample_one(int(length), k, forced, rng))
    return positions
