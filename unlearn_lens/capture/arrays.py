"""What a split's cache holds: the arrays the forward fills and those known before it (SCHEMA.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cache_store import Dynamic, SplitLayout
from unlearn_lens.capture.inputs import SplitInputs
from unlearn_lens.capture.selection import TOKEN_VARIABLES


def dynamic_arrays(split: str, dtype: str, variables: tuple[str, ...] = TOKEN_VARIABLES) -> dict[str, Dynamic]:
    """The arrays the forward passes fill: the kept token-level ones, ``last`` and the split's logits."""
    arrays = {}
    if "resid" in variables:
        arrays["resid"] = Dynamic(("layer", "token", "hidden"), dtype)
    if "mlp_in" in variables:
        arrays["mlp_in"] = Dynamic(("mlp_layer", "token", "hidden"), dtype)
    arrays["last"] = Dynamic(("layer", "sample", "hidden"), dtype)
    if split == "wmdp":
        arrays["final_letter_logits"] = Dynamic(("sample", "choice"), "float32")
    if split == "wmdp_cloze":
        arrays["final_cloze_logprob"] = Dynamic(("sample",), "float32")
    return arrays


def static_arrays(inputs: SplitInputs, layout: SplitLayout, wmdp_extras: dict[str, Any],
                  positions: list[np.ndarray] | None = None) -> dict:
    """Arrays known before any forward pass, with their dims.

    ``positions`` (under ``--token-sample``): the positions kept of each sample; the token axis
    then holds those tokens only (``token_position`` says which), and ``text_input_ids`` /
    ``text_length`` keep every token id of every sample.
    """
    kept_ids = inputs.token_ids if positions is None else [ids[p] for ids, p in zip(inputs.token_ids, positions)]
    input_ids = np.zeros(layout.n_tokens, dtype=np.int32)
    for start, ids in zip(layout.offsets, kept_ids):
        input_ids[start:start + len(ids)] = ids
    token_arrays = layout.token_arrays()
    if positions is not None:
        for start, kept in zip(layout.offsets, positions):
            token_arrays["token_position"][start:start + len(kept)] = kept
    arrays: dict[str, tuple[tuple[str, ...], np.ndarray]] = {"input_ids": (("token",), input_ids)}
    arrays.update({name: (("token",), values) for name, values in token_arrays.items()})
    arrays["sample_offset"] = (("sample",), layout.offsets.astype(np.int64))
    arrays["sample_length"] = (("sample",), layout.lengths.astype(np.int32))
    if positions is not None:
        arrays["text_input_ids"] = (("text_token",), np.concatenate(inputs.token_ids).astype(np.int32))
        arrays["text_length"] = (("sample",), inputs.lengths.astype(np.int32))
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
