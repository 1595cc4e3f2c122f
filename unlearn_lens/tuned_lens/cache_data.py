"""Hidden states from the activation cache: its complete splits, their fit to the model, and the
training residuals and WMDP letter/cloze states read from them (no forward pass).

Every array here equals what ``model_data`` computes by running the same model
(``cache_store/SCHEMA.md`` gives the cache's layout and the cloze positions' formula).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unlearn_lens.core.errors import UserError
from unlearn_lens.tuned_lens.questions import ClozeData, LetterData


def open_cache_splits(cache: str | None) -> dict[str, Any]:
    """The complete splits of an activation cache (none without ``cache``); a warning if none."""
    if cache is None:
        return {}
    import sys

    from cache_store import is_complete, list_splits, open_cache

    try:
        names = list_splits(cache)
    except UserError:
        raise
    except Exception as exc:  # a missing or unreadable store
        raise UserError(f"{cache}: not a readable activation cache ({type(exc).__name__})") from None
    splits = {name: open_cache(cache, name) for name in names if is_complete(cache, name)}
    partial = sorted(name for name, ds in splits.items() if ds.attrs.get("selection"))
    if partial:  # the tuned lens reads every layer and every token of a text
        print(f"warning: {cache} holds a partial capture of {', '.join(partial)} (--layers, --token-sample or "
              "--variables); running the model for those splits instead", file=sys.stderr)
        splits = {name: ds for name, ds in splits.items() if name not in partial}
    elif not splits:
        print(f"warning: {cache} holds no complete split; running the model instead", file=sys.stderr)
    return splits


def check_cache_matches(splits: dict[str, Any], cache: str | None, model, adapter) -> None:
    """Each cached split must come from a model of this architecture (layers x hidden)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    for name, ds in splits.items():
        if int(ds.attrs.get("num_layers", -1)) != adapter.num_layers or int(ds.attrs.get("hidden_size", -1)) != hidden:
            raise UserError(f"{cache}: split {name!r} was captured from a model with {ds.attrs.get('num_layers')} "
                            f"layers x {ds.attrs.get('hidden_size')} hidden, not this model's "
                            f"{adapter.num_layers} x {hidden}; pass the cache of this model")


def cache_token_residuals(ds, max_samples: int | None, max_length: int | None = None):
    """Residuals of the first ``max_samples`` samples' real tokens from a cache split (L+1, n, d).

    Each sample keeps its first ``max_length`` tokens, as the model path truncates its texts.
    """
    import torch

    lengths = np.asarray(ds["sample_length"].values, np.int64)
    offsets = np.asarray(ds["sample_offset"].values, np.int64)
    n = len(lengths) if max_samples is None else min(max_samples, len(lengths))
    if n == 0:
        raise UserError(f"the cache's {ds.attrs.get('split', '')} split holds no samples")
    keep = lengths[:n] if max_length is None else np.minimum(lengths[:n], max_length)
    index = np.concatenate([offset + np.arange(length) for offset, length in zip(offsets[:n], keep)])
    mask = np.asarray(ds["attention_mask"].values[index]).astype(bool)
    resid = np.asarray(ds["resid"].isel(token=index[mask]).values)  # stored dtype; cast per minibatch
    return torch.from_numpy(resid if resid.dtype in (np.float16, np.float32) else resid.astype(np.float32))


def letter_data_from_cache(ds) -> LetterData:
    """Letter scoring input from a cache's ``wmdp`` split (``last``, ``answer``, ``letter_token_ids``)."""
    import torch

    return LetterData(torch.from_numpy(np.asarray(ds["last"].values, np.float32)),
                      np.asarray(ds["answer"].values, np.int64),
                      [int(x) for x in np.asarray(ds["letter_token_ids"].values)])


def cloze_data_from_cache(ds, answers: np.ndarray) -> ClozeData:
    """Cloze scoring input from a cache's ``wmdp_cloze`` split (SCHEMA.md's formula)."""
    import torch

    offsets = np.asarray(ds["sample_offset"].values, np.int64)
    starts = np.asarray(ds["cont_start"].values, np.int64)
    ends = np.asarray(ds["cont_end"].values, np.int64)
    token_index, owner = [], []
    for s, (offset, start, end) in enumerate(zip(offsets, starts, ends)):
        positions = offset + np.arange(start - 1, end - 1)
        token_index.append(positions)
        owner.append(np.full(len(positions), s))
    token_index = np.concatenate(token_index)
    input_ids = np.asarray(ds["input_ids"].values, np.int64)
    states = np.asarray(ds["resid"].isel(token=token_index).values, np.float32)
    return ClozeData(torch.from_numpy(states), input_ids[token_index + 1], np.concatenate(owner),
                     np.asarray(ds["question"].values, np.int64), np.asarray(ds["choice_index"].values, np.int64),
                     np.asarray(answers, np.int64))
