"""Logit lens on cached states (``wmdp_logit_lens/``): WMDP accuracy read out at every layer, no forward pass.

The model's own final norm (once, at every layer including the last, in float32) and unembedding
are applied to the cached residual stream:
- ``letter``: lm-eval's zero-shot letter scoring, final_norm(last[l]) @ letter_unembed^T and the
  argmax over the four answer letters;
- ``cloze``: each choice's continuation scored by its mean log-probability, log_softmax over the
  full vocabulary (from the checkpoint's unembedding), computed once per distinct state and in
  blocks of positions so memory stays bounded by ``block_bytes``; the best-scoring choice is the
  answer.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ["layer", "scoring", "accuracy", "delta_from_final", "n_questions"]


def apply_final_norm(x: np.ndarray, kind: str, weight: np.ndarray, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """LayerNorm ((x-mean)/sqrt(var+eps)*w+b) or RMSNorm (x/sqrt(mean(x^2)+eps)*w), in float32."""
    x = np.asarray(x, dtype=np.float32)
    weight = np.asarray(weight, dtype=np.float32)
    if kind == "layernorm":
        centred = x - x.mean(axis=-1, keepdims=True)
        variance = (centred * centred).mean(axis=-1, keepdims=True)
        out = centred / np.sqrt(variance + np.float32(eps)) * weight
        return out + np.asarray(bias, dtype=np.float32) if bias is not None else out
    if kind == "rmsnorm":
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps)) * weight
    raise ValueError(f"unknown final norm kind {kind!r}")


def letter_predictions(last: np.ndarray, letter_unembed: np.ndarray, norm: dict) -> np.ndarray:
    """(layer, sample) argmax over the four letters of the lens logits."""
    logits = apply_final_norm(last, **norm) @ np.asarray(letter_unembed, dtype=np.float32).T
    return logits.argmax(axis=-1)


def cloze_positions(offsets: np.ndarray, cont_start: np.ndarray, cont_end: np.ndarray,
                    samples: np.ndarray, token_position: np.ndarray | None = None,
                    lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(token_index, sequence)``: flat token indices whose states predict each continuation token.

    Position p in [cont_start - 1, cont_end - 1) of sequence s predicts the token at p + 1. With
    ``token_position`` and ``lengths`` (the kept tokens' positions and their count per sample, as a
    ``--token-sample`` cache holds them) positions are looked up among the kept ones: capture always
    keeps these.
    """
    indices, owner = [], []
    for row, s in enumerate(samples):
        positions = np.arange(cont_start[s] - 1, cont_end[s] - 1)
        if token_position is None:
            found = offsets[s] + positions
        else:
            kept = np.asarray(token_position[offsets[s]:offsets[s] + lengths[s]])
            at = np.searchsorted(kept, positions)
            if (at >= len(kept)).any() or not np.array_equal(kept[np.minimum(at, len(kept) - 1)], positions):
                raise ValueError(f"sequence {s}: the cache did not keep every position its cloze score reads")
            found = offsets[s] + at
        indices.append(found)
        owner.append(np.full(len(positions), row))
    return np.concatenate(indices).astype(np.int64), np.concatenate(owner)


def _block_rows(n_rows: int, vocab: int, block_bytes: int) -> list[slice]:
    block = max(1, block_bytes // (4 * vocab))
    return [slice(start, min(start + block, n_rows)) for start in range(0, n_rows, block)]


def _log_normalisers(normed: np.ndarray, unembedding: np.ndarray) -> np.ndarray:
    """logsumexp over the vocabulary of ``normed @ U^T``, per row (float32 logits, float64 result)."""
    logits = normed @ unembedding.T  # U is (vocab, d): BLAS reads the transpose in place
    peak = logits.max(axis=1, keepdims=True)
    return np.log(np.exp(logits - peak).sum(axis=1)).astype(np.float64) + peak[:, 0]


def _distinct_rows(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: indices of the bitwise-distinct rows and, per row, which of them it is.

    The choices of a question share their context, so the state before each continuation (and
    before any common first tokens) is the same row several times: its vocabulary is scored once."""
    rows = np.ascontiguousarray(states)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def token_logprobs(states: np.ndarray, targets: np.ndarray, unembedding: np.ndarray, norm: dict,
                   block_bytes: int = 64 << 20, map_blocks=map) -> np.ndarray:
    """log_softmax(U norm(h))[target] for each row of ``states`` (P, d).

    The vocabulary normaliser is computed once per distinct row, in blocks of rows so that at
    most ``block_bytes`` of logits exist per block; ``map_blocks`` may run blocks in parallel."""
    unembedding = np.asarray(unembedding, dtype=np.float32)
    first, inverse = _distinct_rows(states)
    normed = apply_final_norm(np.asarray(states)[first], **norm)
    blocks = _block_rows(len(normed), unembedding.shape[0], block_bytes)
    parts = list(map_blocks(lambda rows: _log_normalisers(normed[rows], unembedding), blocks))
    if not parts:
        return np.zeros(0)
    target_logits = np.einsum("pd,pd->p", normed[inverse], unembedding[targets])
    return target_logits - np.concatenate(parts)[inverse]


def cloze_scores(states: np.ndarray, targets: np.ndarray, owner: np.ndarray, n_sequences: int,
                 unembedding: np.ndarray, norm: dict, map_blocks=map, block_bytes: int = 64 << 20) -> np.ndarray:
    """(layer, sequence) mean continuation log-probability; ``states`` is (layer, P, d).

    All layers' positions are scored together in row blocks (bigger matrix products)."""
    n_layers, n_positions, hidden = states.shape
    flat = token_logprobs(states.reshape(-1, hidden), np.tile(targets, n_layers), unembedding, norm,
                          block_bytes, map_blocks).reshape(n_layers, n_positions)
    counts = np.maximum(np.bincount(owner, minlength=n_sequences), 1)
    return np.array([np.bincount(owner, weights=row, minlength=n_sequences) / counts for row in flat]).reshape(
        n_layers, n_sequences)


def cloze_predictions(scores: np.ndarray, question: np.ndarray, choice_index: np.ndarray,
                      questions: np.ndarray) -> np.ndarray:
    """(layer, question) choice with the highest score, for each question in ``questions``."""
    table = np.full((scores.shape[0], len(questions), int(choice_index.max()) + 1), -np.inf)
    row_of = {int(q): i for i, q in enumerate(questions)}
    for s in range(scores.shape[1]):
        table[:, row_of[int(question[s])], int(choice_index[s])] = scores[:, s]
    return table.argmax(axis=-1)


def accuracy_rows(scoring: str, predictions: np.ndarray, answer: np.ndarray, layers=None) -> list[dict]:
    """Rows of ``wmdp_lens_results.csv`` for one scoring: accuracy and its difference from the last layer
    (``layers``: the cached layers' numbers, default 0, 1, ...; the last is always the final layer)."""
    accuracy = (predictions == np.asarray(answer)[None, :]).mean(axis=1)
    layers = range(len(accuracy)) if layers is None else layers
    return [{"layer": int(layer), "scoring": scoring, "accuracy": float(accuracy[i]),
             "delta_from_final": float(accuracy[i] - accuracy[-1]), "n_questions": int(predictions.shape[1])}
            for i, layer in enumerate(layers)]
