"""Forget / retain NLL and WMDP multiple-choice accuracy (letter and cloze scoring) of one model.

``letter`` is lm-eval-harness's ``wmdp_bio`` zero-shot scoring: the argmax over the logits of
" A".." D" at the last token of the letter prompt. ``cloze`` is the argmax over choices of the
mean log-probability of each choice's tokens given the question. Both encode prompts without
special tokens (lm-eval's default for these models); NLL texts use the tokenizer's default.
Sequences are right-padded here, so the last real token is found from the lengths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from unlearn_lens import prompts
from unlearn_lens.core.settings import DEFAULT_MAX_LENGTH


def _device_of(model, device):
    return torch.device(device) if device is not None else next(model.parameters()).device


def _pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def _logprobs(model, ids, mask) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def nll_sums(model, tokenizer, texts: Sequence[str], *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
             device=None) -> tuple[float, int]:
    """Summed next-token NLL and number of predicted tokens over ``texts``."""
    device = _device_of(model, device)
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                   for text in texts[start:start + batch_size]]
        encoded = [e for e in encoded if len(e) > 1]
        if not encoded:
            continue
        ids, mask = _pad(encoded, _pad_id(tokenizer), device)
        logprobs = _logprobs(model, ids, mask)
        picked = logprobs[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        valid = mask[:, 1:].bool()
        total -= float(picked[valid].sum())
        count += int(valid.sum())
    return total, count


def mean_token_nll(model, tokenizer, texts: Sequence[str], **kwargs) -> float:
    """Mean NLL per predicted token over all ``texts`` (token-weighted); NaN without tokens."""
    total, count = nll_sums(model, tokenizer, texts, **kwargs)
    return total / count if count else float("nan")


@torch.no_grad()
def letter_scores(model, tokenizer, items, *, max_length: int = 2048, batch_size: int = 8,
                  device=None) -> torch.Tensor:
    """(n_items, 4) logits of the answer letters at the last prompt token."""
    device = _device_of(model, device)
    letter_ids = torch.tensor(prompts.letter_token_ids(tokenizer), device=device)
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        encoded = [prompts.encode_prompt(tokenizer, prompts.letter_prompt(i.question, i.choices))
                   [-max_length:] for i in chunk]
        ids, mask = _pad(encoded, _pad_id(tokenizer), device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        last = mask.sum(1) - 1
        final = logits[torch.arange(len(chunk), device=device), last]
        rows.append(final[:, letter_ids].cpu())
    return torch.cat(rows) if rows else torch.empty(0, len(prompts.LETTERS))


@torch.no_grad()
def cloze_scores(model, tokenizer, items, *, max_length: int = 2048, batch_size: int = 8,
                 device=None) -> list[list[float]]:
    """Per item, the mean log-probability of each choice's tokens given the cloze context."""
    device = _device_of(model, device)
    pairs = []  # (item index, context ids, continuation ids)
    for index, item in enumerate(items):
        context = prompts.encode_prompt(tokenizer, prompts.cloze_context(item.question))
        for continuation in prompts.cloze_continuations(item.choices):
            cont = prompts.encode_prompt(tokenizer, continuation)
            keep = max(1, max_length - len(cont))
            pairs.append((index, context[-keep:], cont))
    scores: list[list[float]] = [[] for _ in items]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask = _pad([c + k for _, c, k in chunk], _pad_id(tokenizer), device)
        logprobs = _logprobs(model, ids, mask)
        for row, (index, context, cont) in enumerate(chunk):
            positions = torch.arange(len(context) - 1, len(context) + len(cont) - 1, device=device)
            targets = ids[row, positions + 1]
            scores[index].append(float(logprobs[row, positions, :].gather(-1, targets[:, None]).mean()))
    return scores


def letter_accuracy(model, tokenizer, items, **kwargs) -> float:
    if not items:
        return float("nan")
    scores = letter_scores(model, tokenizer, items, **kwargs)
    answers = torch.tensor([item.answer for item in items])
    return float((scores.argmax(-1) == answers).float().mean())


def cloze_accuracy(model, tokenizer, items, **kwargs) -> float:
    if not items:
        return float("nan")
    scores = cloze_scores(model, tokenizer, items, **kwargs)
    correct = [max(range(len(s)), key=s.__getitem__) == item.answer for s, item in zip(scores, items)]
    return sum(correct) / len(correct)


def evaluate(model, tokenizer, data_dir: str | Path | None = None, *, forget_texts: Sequence[str] | None = None,
             retain_texts: Sequence[str] | None = None, mcq_items=None, max_length: int = DEFAULT_MAX_LENGTH,
             batch_size: int = 8, device=None) -> dict:
    """Forget NLL, retain NLL / perplexity, letter and cloze WMDP accuracy of ``model``.

    Texts and questions come from the arguments, or else from ``data_dir`` (forget.txt,
    retain.txt, wmdp_mcq.jsonl; a missing question file gives NaN accuracies). Runs in eval
    mode without gradients and restores the model's previous mode.
    """
    from unlearn_lens import data as data_module

    if data_dir is not None:
        forget_texts = data_module.read_texts(data_dir, "forget") if forget_texts is None else forget_texts
        retain_texts = data_module.read_texts(data_dir, "retain") if retain_texts is None else retain_texts
        if mcq_items is None and (Path(data_dir) / data_module.FILES["wmdp"]).is_file():
            mcq_items = data_module.read_mcq(data_dir)
    was_training = model.training
    model.eval()
    try:
        options = {"max_length": max_length, "batch_size": batch_size, "device": device}
        forget_nll = mean_token_nll(model, tokenizer, list(forget_texts or []), **options)
        retain_nll = mean_token_nll(model, tokenizer, list(retain_texts or []), **options)
        items = list(mcq_items or [])
        mcq_options = {"batch_size": batch_size, "device": device}
        result = {
            "forget_nll": forget_nll,
            "retain_nll": retain_nll,
            "retain_ppl": math.exp(retain_nll) if retain_nll == retain_nll else float("nan"),
            "letter_accuracy": letter_accuracy(model, tokenizer, items, **mcq_options),
            "cloze_accuracy": cloze_accuracy(model, tokenizer, items, **mcq_options),
            "n_forget_texts": len(forget_texts or []),
            "n_retain_texts": len(retain_texts or []),
            "n_questions": len(items),
        }
    finally:
        model.train(was_training)
    return result
