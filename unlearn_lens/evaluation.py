"""Forget / retain NLL and WMDP multiple-choice accuracy (letter and cloze scoring) of one model.

Where the data has questions about the retain set too (``retain_mcq.jsonl``, the planted-facts
testbed's entities B), their cloze accuracy is reported beside (``retain_cloze_accuracy``); on a
testbed, also the forget texts' NLL on the facts' values alone (``forget_value_nll``: the NLL of the
knowledge, where ``forget_nll`` is mostly that of the templates around it).

``letter`` is lm-eval-harness's ``wmdp_bio`` zero-shot scoring: the argmax over the logits of
" A".." D" at the last token of the letter prompt. ``cloze`` is the argmax over choices of the
mean log-probability of each choice's tokens given the question. Both encode prompts without
special tokens (lm-eval's default for these models); NLL texts use the tokenizer's default.
Sequences are right-padded here, so the last real token is found from the lengths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from analyses.uncertainty import PER_ITEM  # per-item results, what the intervals resample
from unlearn_lens import prompts
from unlearn_lens.core.errors import UserError
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
def nll_per_text(model, tokenizer, texts: Sequence[str], *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
                 device=None, spans: Sequence[Sequence[tuple[int, int]]] | None = None
                 ) -> tuple[float, int, list[float], list[int]]:
    """Summed next-token NLL and predicted tokens over ``texts``, in total and per text.

    Returns ``(total, count, sums, counts)``; a text of fewer than two tokens predicts nothing
    (sum 0, count 0). ``total`` is summed batch by batch, as it always was, so the mean NLL does
    not depend on whether the per-text values are asked for. With ``spans`` (per text, character
    spans), only the predicted tokens that overlap a span count (``value_mask``).
    """
    device = _device_of(model, device)
    total, count = 0.0, 0
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in chunk]
        reads = ([value_mask(tokenizer, text, text_spans, max_length)
                  for text, text_spans in zip(chunk, spans[start:start + batch_size])]
                 if spans is not None else [[True] * len(e) for e in encoded])
        kept = [(e, r) for e, r in zip(encoded, reads) if len(e) > 1]
        batch_sums: list[float] = []
        batch_counts: list[int] = []
        if kept:
            ids, mask = _pad([e for e, _ in kept], _pad_id(tokenizer), device)
            read, _ = _pad([[int(flag) for flag in r] for _, r in kept], 0, device)
            picked = _logprobs(model, ids, mask)[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            valid = (mask[:, 1:] * read[:, 1:]).bool()
            total -= float(picked[valid].sum())
            count += int(valid.sum())
            batch_sums = (-picked.masked_fill(~valid, 0.0).sum(1)).tolist()
            batch_counts = valid.sum(1).tolist()
        row = iter(zip(batch_sums, batch_counts))
        for e in encoded:
            text_sum, text_count = next(row) if len(e) > 1 else (0.0, 0)
            sums.append(float(text_sum))
            counts.append(int(text_count))
    return total, count, sums, counts


def value_mask(tokenizer, text: str, spans: Sequence[tuple[int, int]], max_length: int) -> list[bool]:
    """Per token of ``text`` (encoded as ``nll_per_text`` encodes it), whether it overlaps one of the
    character ``spans``: the tokens of a planted fact's values (``testbed.in_spans``, ``plant``'s answer rule)."""
    from unlearn_lens.testbed import in_spans

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("the value-token NLL needs a fast tokenizer (character offsets); this one is not")
    return in_spans(tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
                    ["offset_mapping"], spans)


def nll_sums(model, tokenizer, texts: Sequence[str], **kwargs) -> tuple[float, int]:
    """Summed next-token NLL and number of predicted tokens over ``texts``."""
    total, count, _, _ = nll_per_text(model, tokenizer, texts, **kwargs)
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


def _encode_cloze(tokenizer, items) -> list[tuple[list[int], list[list[int]]]]:
    """Per item, (context ids, each choice's continuation ids)."""
    return [(prompts.encode_prompt(tokenizer, prompts.cloze_context(item.question)),
             [prompts.encode_prompt(tokenizer, c) for c in prompts.cloze_continuations(item.choices)])
            for item in items]


def _per_choice_scores(model, encoded, pad_id: int, max_length: int, batch_size: int, device) -> list[list[float]]:
    """Cloze scores with one forward pass per (question, choice): context + continuation, right-padded."""
    pairs = []  # (item index, context ids, continuation ids)
    for index, (context, continuations) in enumerate(encoded):
        for cont in continuations:
            keep = max(1, max_length - len(cont))
            pairs.append((index, context[-keep:], cont))
    scores: list[list[float]] = [[] for _ in encoded]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask = _pad([c + k for _, c, k in chunk], pad_id, device)
        logprobs = _logprobs(model, ids, mask)
        for row, (index, context, cont) in enumerate(chunk):
            positions = torch.arange(len(context) - 1, len(context) + len(cont) - 1, device=device)
            targets = ids[row, positions + 1]
            scores[index].append(float(logprobs[row, positions, :].gather(-1, targets[:, None]).mean()))
    return scores


def _shared_context_scores(model, encoded, pad_id: int, batch_size: int, device) -> list[list[float]]:
    """The same scores with each question's context computed once: the contexts (left-padded, explicit
    positions) fill a KV cache, repeated once per choice, and only the continuations run again. The
    first continuation token is read from the context's last logits, so single-token choices need no
    second pass. Equal to ``_per_choice_scores`` up to float summation order."""
    scores: list[list[float]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        n_choices = len(chunk[0][1])
        width = max(len(context) for context, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (context, _) in enumerate(chunk):
            ids[row, width - len(context):] = torch.tensor(context, dtype=torch.long)
            mask[row, width - len(context):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(n_choices, 0)
        cache_name = _cache_argument(model)
        conts = [cont for _, continuations in chunk for cont in continuations]
        rest = max(len(cont) for cont in conts) - 1
        later = None
        if rest > 0:  # continuation tokens after the first are fed, each predicting the next
            cache = getattr(out, cache_name)
            cache.batch_repeat_interleave(n_choices)
            cont_ids = torch.full((len(conts), rest), pad_id, dtype=torch.long)
            cont_mask = torch.zeros((len(conts), rest), dtype=torch.long)
            for row, cont in enumerate(conts):
                cont_ids[row, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                cont_mask[row, :len(cont) - 1] = 1
            cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
            cont_positions = mask.sum(-1).repeat_interleave(n_choices)[:, None] + torch.arange(rest, device=device)
            full_mask = torch.cat([mask.repeat_interleave(n_choices, 0), cont_mask], -1)
            logits = model(input_ids=cont_ids, attention_mask=full_mask, position_ids=cont_positions,
                           use_cache=True, **{cache_name: cache}).logits
            later = torch.log_softmax(logits.float(), dim=-1)
        for row, cont in enumerate(conts):
            values = [float(first[row, cont[0]])]
            values += [float(later[row, j, token]) for j, token in enumerate(cont[1:])] if later is not None else []
            if row % n_choices == 0:
                scores.append([])
            scores[-1].append(sum(values) / len(values))
    return scores


def _cache_argument(model) -> str:
    """The name under which this transformers version passes (and returns) the KV cache."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _caches(model) -> bool:
    """Whether ``model`` is a transformers model that can carry a KV cache (the shared-context path)."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, PreTrainedModel) and bool(getattr(base.config, "use_cache", True))


@torch.no_grad()
def cloze_scores(model, tokenizer, items, *, max_length: int = 2048, batch_size: int = 8,
                 device=None) -> list[list[float]]:
    """Per item, the mean log-probability of each choice's tokens given the cloze context.

    A transformers model computes each question's context once (``batch_size`` questions per pass,
    ``_shared_context_scores``); any other callable, or a context + choice longer than
    ``max_length`` (cut from the left), runs one pass per choice (``batch_size`` pairs per pass).
    """
    device = _device_of(model, device)
    encoded = _encode_cloze(tokenizer, items)
    if not encoded:
        return []
    fits = all(len(context) + len(cont) <= max_length for context, conts in encoded for cont in conts)
    if fits and _caches(model) and len({len(conts) for _, conts in encoded}) == 1:
        return _shared_context_scores(model, encoded, _pad_id(tokenizer), batch_size, device)
    return _per_choice_scores(model, encoded, _pad_id(tokenizer), max_length, batch_size, device)


def letter_correct(model, tokenizer, items, **kwargs) -> list[int]:
    """Per item, 1 where the highest answer-letter logit is the correct answer's, else 0."""
    if not items:
        return []
    scores = letter_scores(model, tokenizer, items, **kwargs)
    answers = torch.tensor([item.answer for item in items])
    return [int(v) for v in (scores.argmax(-1) == answers).tolist()]


def cloze_correct(model, tokenizer, items, **kwargs) -> list[int]:
    """Per item, 1 where the correct choice has the highest mean log-probability, else 0."""
    scores = cloze_scores(model, tokenizer, items, **kwargs) if items else []
    return [int(max(range(len(s)), key=s.__getitem__) == item.answer) for s, item in zip(scores, items)]


def _share(correct: Sequence[int]) -> float:
    return sum(correct) / len(correct) if correct else float("nan")


def letter_accuracy(model, tokenizer, items, **kwargs) -> float:
    return _share(letter_correct(model, tokenizer, items, **kwargs))


def cloze_accuracy(model, tokenizer, items, **kwargs) -> float:
    return _share(cloze_correct(model, tokenizer, items, **kwargs))


def evaluate(model, tokenizer, data_dir: str | Path | None = None, *, forget_texts: Sequence[str] | None = None,
             retain_texts: Sequence[str] | None = None, mcq_items=None, retain_mcq_items=None,
             value_spans: Mapping[str, Sequence[tuple[int, int]]] | None = None,
             max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8, device=None) -> dict:
    """Forget NLL, retain NLL / perplexity, letter and cloze WMDP accuracy of ``model``, the cloze
    accuracy on retain-set questions (``retain_cloze_accuracy``, NaN without any), and the forget NLL
    of the planted facts' values alone (``forget_value_nll``, NaN without ``value_spans``).

    Texts and questions come from the arguments, or else from ``data_dir`` (forget.txt,
    retain.txt, wmdp_mcq.jsonl, retain_mcq.jsonl, a testbed's value spans; a missing question file
    gives NaN accuracies). ``value_spans`` maps a forget text to its values' character spans
    (``unlearn_lens.testbed.value_spans``): ``forget_value_nll`` reads only the forget texts it names,
    and only their value tokens. Runs in eval mode without gradients and restores the model's mode.
    """
    from unlearn_lens import data as data_module

    if data_dir is not None:
        if value_spans is None:
            from unlearn_lens.testbed import value_spans as testbed_spans

            value_spans = testbed_spans(data_dir)
        forget_texts = data_module.read_texts(data_dir, "forget") if forget_texts is None else forget_texts
        retain_texts = data_module.read_texts(data_dir, "retain") if retain_texts is None else retain_texts
        if mcq_items is None and (Path(data_dir) / data_module.FILES["wmdp"]).is_file():
            mcq_items = data_module.read_mcq(data_dir)
        if retain_mcq_items is None:
            retain_mcq_items = data_module.read_retain_mcq(data_dir)
    was_training = model.training
    model.eval()
    try:
        options = {"max_length": max_length, "batch_size": batch_size, "device": device}
        per_item: dict[str, dict[str, list]] = {}
        nlls = {}
        for metric, texts in (("forget_nll", forget_texts), ("retain_nll", retain_texts)):
            total, count, sums, counts = nll_per_text(model, tokenizer, list(texts or []), **options)
            nlls[metric] = total / count if count else float("nan")
            per_item[metric] = {"sum": sums, "count": counts}
        # character offsets find the value tokens; a slow tokenizer has none: NaN, not a failed evaluation
        spans_of = value_spans if getattr(tokenizer, "is_fast", False) else {}
        facts = [(text, spans_of[text]) for text in forget_texts or [] if text in (spans_of or {})]
        nlls["forget_value_nll"] = float("nan")
        if facts:
            total, count, sums, counts = nll_per_text(model, tokenizer, [text for text, _ in facts],
                                                      spans=[spans for _, spans in facts], **options)
            nlls["forget_value_nll"] = total / count if count else float("nan")
            per_item["forget_value_nll"] = {"sum": sums, "count": counts}
        items = list(mcq_items or [])
        mcq_options = {"batch_size": batch_size, "device": device}
        per_item["letter_accuracy"] = {"correct": letter_correct(model, tokenizer, items, **mcq_options)}
        per_item["cloze_accuracy"] = {"correct": cloze_correct(model, tokenizer, items, **mcq_options)}
        retain_items = list(retain_mcq_items or [])
        per_item["retain_cloze_accuracy"] = {"correct": cloze_correct(model, tokenizer, retain_items, **mcq_options)}
        retain_nll = nlls["retain_nll"]
        result = {
            "forget_nll": nlls["forget_nll"],
            "forget_value_nll": nlls["forget_value_nll"],
            "retain_nll": retain_nll,
            "retain_ppl": math.exp(retain_nll) if retain_nll == retain_nll else float("nan"),
            "letter_accuracy": _share(per_item["letter_accuracy"]["correct"]),
            "cloze_accuracy": _share(per_item["cloze_accuracy"]["correct"]),
            "retain_cloze_accuracy": _share(per_item["retain_cloze_accuracy"]["correct"]),
            "n_forget_texts": len(forget_texts or []),
            "n_retain_texts": len(retain_texts or []),
            "n_questions": len(items),
            "n_retain_questions": len(retain_items),
            PER_ITEM: per_item,
        }
    finally:
        model.train(was_training)
    return result
