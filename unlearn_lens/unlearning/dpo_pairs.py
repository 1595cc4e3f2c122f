"""DPO's preference pairs built from plain forget texts.

Each forget sequence of ``n`` real tokens is split at ``p = max(1, n // 2)``: the first half is
the prompt, the rest the original continuation (dispreferred). The preferred continuation is a
refusal drawn, per sequence, with a seeded generator from a fixed list (the first lines of
TOFU's ``data/idontknow.jsonl``, the list open-unlearning's ``QAwithIdkDataset`` samples from).
Log-probabilities are then summed over the continuation tokens only, as open-unlearning's labels
mask the question.
"""

from __future__ import annotations

import torch

#: the first ten lines of locuslab/tofu data/idontknow.jsonl (open-unlearning's data/idk.jsonl).
REFUSALS = (
    "I'm not certain about that.",
    "That's beyond my current knowledge base.",
    "I don't have that information.",
    "I'm not sure.",
    "I haven't learned about that topic.",
    "That's something I need to look up.",
    "I'm at a loss for that one.",
    "I don't have the answer to that question.",
    "That's outside my area of expertise.",
    "I'm afraid I can't provide an answer to that.",
)


def refusal_token_ids(tokenizer) -> list[list[int]]:
    """Each refusal tokenized as a continuation (leading space, no special tokens)."""
    return [tokenizer(" " + text, add_special_tokens=False)["input_ids"] for text in REFUSALS]


def split_point(length: int) -> int:
    """Prompt length of a sequence of ``length`` real tokens: the first half, at least one token."""
    return max(1, length // 2)


def build_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, refusals: list[list[int]],
                generator: torch.Generator, pad_id: int) -> tuple[dict, dict]:
    """``(win, lose)`` batches from a right-padded forget batch; each has ``input_ids``,
    ``attention_mask`` and ``labels_mask`` (1 on the continuation tokens that are scored).

    lose = the forget sequence itself, scored after its prompt; win = the prompt followed by a
    refusal (index drawn from ``generator``, one per sequence in batch order), scored on the refusal.
    """
    lengths = attention_mask.sum(-1).tolist()
    lose_labels = torch.zeros_like(attention_mask)
    rows, win_labels = [], []
    for i, length in enumerate(lengths):
        p = split_point(int(length))
        lose_labels[i, p:int(length)] = 1
        choice = int(torch.randint(len(refusals), (1,), generator=generator))
        prompt = input_ids[i, :p].tolist()
        rows.append(prompt + list(refusals[choice]))
        win_labels.append([0] * p + [1] * len(refusals[choice]))
    width = max(len(r) for r in rows)
    win_ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    win_mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
    win_lab = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
    for i, (row, labels) in enumerate(zip(rows, win_labels)):
        win_ids[i, :len(row)] = torch.tensor(row, dtype=input_ids.dtype)
        win_mask[i, :len(row)] = 1
        win_lab[i, :len(row)] = torch.tensor(labels, dtype=attention_mask.dtype)
    device = input_ids.device
    win = {"input_ids": win_ids.to(device), "attention_mask": win_mask.to(device), "labels_mask": win_lab.to(device)}
    lose = {"input_ids": input_ids, "attention_mask": attention_mask, "labels_mask": lose_labels}
    return win, lose
