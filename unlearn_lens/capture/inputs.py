"""Tokenise every sample of every split up front, so the cache layout is known before any forward.

Capture is deterministic because of this: the same data, tokenizer and settings always give the
same samples, token ids and offsets, whichever process (or resumed run) computes which block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_lens import data as datasets
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_counts
from unlearn_lens.prompts import cloze_context, cloze_continuations, encode_prompt, letter_prompt

#: Splits the capture command accepts; ``wmdp`` brings ``wmdp_cloze`` with it.
CAPTURE_SPLITS = ("forget", "retain", "wmdp")


@dataclass
class SplitInputs:
    """Token ids of each sample of one split, plus per-sample data known before the forward."""

    split: str
    token_ids: list[np.ndarray]
    sample_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # answer, question, cont_*...

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.token_ids], dtype=np.int64)


def _encode(tokenizer, text: str) -> list[int]:
    """Plain texts (forget / retain) as the tokenizer encodes them by default (BOS where it adds one)."""
    return list(tokenizer(text)["input_ids"])


def _keep_start(ids: list[int], max_length: int) -> list[int]:
    return ids[:max_length]


def _keep_end(ids: list[int], max_length: int) -> list[int]:
    """Prompts keep their end (the question and "Answer:"), as lm-eval truncates on the left."""
    return ids[-max_length:]


def text_inputs(tokenizer, texts: list[str], split: str, max_length: int) -> SplitInputs:
    """forget / retain: one sample per text, truncated to ``max_length`` tokens."""
    ids = [np.asarray(_keep_start(_encode(tokenizer, t), max_length), dtype=np.int32) for t in texts]
    return SplitInputs(split, ids)


def letter_inputs(tokenizer, items: list[datasets.MCQItem], max_length: int) -> SplitInputs:
    """wmdp: one lm-eval ``wmdp_bio`` letter prompt per question."""
    ids = [np.asarray(_keep_end(encode_prompt(tokenizer, letter_prompt(q.question, q.choices)), max_length),
                      dtype=np.int32) for q in items]
    return SplitInputs("wmdp", ids, {"answer": np.array([q.answer for q in items], dtype=np.int8)})


def cloze_inputs(tokenizer, items: list[datasets.MCQItem], max_length: int) -> SplitInputs:
    """wmdp_cloze: question context + each choice; context and continuation tokenised apart."""
    ids, question, choice, start, end = [], [], [], [], []
    for index, item in enumerate(items):
        context = encode_prompt(tokenizer, cloze_context(item.question))
        for number, continuation in enumerate(cloze_continuations(item.choices)):
            cont = encode_prompt(tokenizer, continuation)
            if not cont:
                raise UserError(f"question {item.id}: choice {number} tokenises to nothing")
            cont = cont[:max(1, max_length - 1)]
            ctx = context[-max(1, max_length - len(cont)):]
            ids.append(np.asarray(ctx + cont, dtype=np.int32))
            question.append(index)
            choice.append(number)
            start.append(len(ctx))
            end.append(len(ctx) + len(cont))
    arrays = {"question": np.array(question, dtype=np.int32), "choice_index": np.array(choice, dtype=np.int8),
              "cont_start": np.array(start, dtype=np.int32), "cont_end": np.array(end, dtype=np.int32)}
    return SplitInputs("wmdp_cloze", ids, arrays)


def parse_splits(value: str) -> list[str]:
    """``forget,retain,wmdp`` -> the splits to capture, ``wmdp_cloze`` added after ``wmdp``."""
    names = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in names if s not in CAPTURE_SPLITS]
    if unknown or not names:
        raise UserError(f"unknown split(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CAPTURE_SPLITS)}")
    ordered = [s for s in CAPTURE_SPLITS if s in names]
    return [x for s in ordered for x in ((s, "wmdp_cloze") if s == "wmdp" else (s,))]


def build_inputs(tokenizer, data_dir: str | Path, splits: list[str], max_samples: int,
                 max_length: int) -> dict[str, SplitInputs]:
    """Tokenised inputs of each requested split (first ``max_samples`` texts or questions)."""
    check_counts(max_samples=max_samples, max_length=max_length)
    inputs: dict[str, Any] = {}
    for split in splits:
        if split in ("forget", "retain"):
            inputs[split] = text_inputs(tokenizer, datasets.read_texts(data_dir, split)[:max_samples], split, max_length)
        elif split == "wmdp":
            inputs[split] = letter_inputs(tokenizer, datasets.read_mcq(data_dir)[:max_samples], max_length)
        elif split == "wmdp_cloze":
            inputs[split] = cloze_inputs(tokenizer, datasets.read_mcq(data_dir)[:max_samples], max_length)
    return inputs
