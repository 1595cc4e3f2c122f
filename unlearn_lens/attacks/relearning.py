"""Relearning controls: fine-tuning on unrelated text, and on held-out facts of the forget topic.

Beside the forget-text relearning of ``unlearn-lens relearn`` (``unlearn_lens/relearn.py``, whose
training loop these reuse):

* ``relearn-unrelated`` fine-tunes on N unrelated texts (default 10, drawn from the retain pool:
  WikiText for hub data). Lucki et al. 2024 ("An Adversarial Perspective on Machine Unlearning for
  AI Safety") find that ten unrelated examples recover most of what RMU hid: the knowledge was
  suppressed, not removed.
* ``relearn-heldout`` splits the evaluation questions by id into two halves (a seeded hash, written
  to ``attacks/heldout_split.json``), fine-tunes on the first half's facts (question + correct
  answer, the data module's forget-text format) and evaluates on the other half (Deeb & Roger
  2024, "Do Unlearning Methods Remove Information from Language Model Weights?"). Its rows carry
  both unattacked models' metrics on that half as their reference.

Both run on the base too (the control row). The evaluation-leak guard: no question an attack is
evaluated on may be in its training text, checked by id and by normalised text; a run that
would break it is refused before any model loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Iterable, Sequence

from analyses.io import atomic_write_json
from unlearn_lens.attacks.base import METRICS, AttackContext, AttackResult
from unlearn_lens.core.errors import UserError

#: This module's options (``AttackSettings.options``) and their defaults.
ATTACK_OPTIONS = {
    "relearn_examples": 10,     # unrelated texts fine-tuned on (relearn-unrelated)
    "relearn_steps": 20,        # optimizer steps of each relearning control
    "relearn_lr": 1e-5,         # AdamW learning rate (constant), as `unlearn-lens relearn`
    "relearn_batch_size": 4,    # texts per step
}
SPLIT_FILE = "heldout_split.json"
_SPLIT_SALT = "unlearn-lens/relearn-heldout"
#: Normalised questions shorter than this are not searched for (too generic to be a leak).
MIN_LEAK_CHARS = 12
TARGETS = (("modified", "modified"), ("control", "base"))  # (row target, model loaded)


def _option(ctx: AttackContext, name: str):
    return ctx.settings.options.get(name, ATTACK_OPTIONS[name])


def _check_options(ctx: AttackContext) -> tuple[int, int, float, int]:
    """(examples, steps, lr, batch size), read as numbers (the command line gives strings) and checked."""
    values = {}
    for key, default in ATTACK_OPTIONS.items():
        raw = _option(ctx, key)
        try:
            values[key] = type(default)(float(raw)) if isinstance(default, int) else float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{key} must be a number, got {raw!r}") from None
        if isinstance(default, int) and values[key] < 1:
            raise UserError(f"{key} must be at least 1, got {raw}")
    if not values["relearn_lr"] > 0:
        raise UserError(f"relearn_lr must be a positive number, got {values['relearn_lr']}")
    return (values["relearn_examples"], values["relearn_steps"], values["relearn_lr"], values["relearn_batch_size"])


# --- the evaluation-leak guard -------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, whitespace collapsed: the form in which questions are searched for."""
    return " ".join(str(text).lower().split())


def leaked_questions(train_texts: Iterable[str], eval_items: Sequence, train_ids: Iterable[str] = ()) -> dict:
    """``{"by_id": [...], "by_text": [...]}``: evaluation question ids found in the training data."""
    eval_ids = {str(item.id) for item in eval_items}
    by_id = sorted(eval_ids & {str(i) for i in train_ids})
    corpus = "\n".join(normalise(t) for t in train_texts)
    by_text = [str(item.id) for item in eval_items
               if len(normalise(item.question)) >= MIN_LEAK_CHARS and normalise(item.question) in corpus]
    return {"by_id": by_id, "by_text": by_text}


def check_no_leak(train_texts: Iterable[str], eval_items: Sequence, train_ids: Iterable[str] = (),
                  what: str = "relearning") -> None:
    """Refuse (UserError) when an evaluation question is in the training data, by id or by text."""
    leaks = leaked_questions(train_texts, eval_items, train_ids)
    if leaks["by_id"] or leaks["by_text"]:
        found = "; ".join(f"by {kind.split('_')[1]}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"
                          for kind, ids in leaks.items() if ids)
        raise UserError(f"evaluation-leak guard: the {what} training text contains evaluation questions ({found}); "
                        "refusing to run, the attack would measure memorisation (rebuild the data with "
                        "`unlearn-lens datasets create`)")


# --- the held-out split --------------------------------------------------------------------------

def heldout_split(items: Sequence, seed: int) -> tuple[list, list]:
    """(train half, evaluation half) of ``items``, by a seeded hash of each question id.

    Ids are ranked by ``sha256(salt:seed:id)``; the first ``n // 2`` distinct ids train, the rest
    are evaluated. Items sharing an id land on the same side; file order is kept in each half.
    """
    ids = list(dict.fromkeys(str(item.id) for item in items))
    if len(ids) < 2:
        raise UserError(f"relearn-heldout needs at least 2 evaluation questions (distinct ids), got {len(ids)}")
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{_SPLIT_SALT}:{seed}:{i}".encode()).hexdigest())
    train_ids = set(ranked[: len(ids) // 2])
    return [it for it in items if str(it.id) in train_ids], [it for it in items if str(it.id) not in train_ids]


def fact_text(item) -> str:
    """A question and its correct answer on one line, as ``datasets create`` writes forget facts."""
    return re.sub(r"\s+", " ", f"{item.question} {item.choices[item.answer]}").strip()


# --- the attacks ---------------------------------------------------------------------------------

def _finetune_and_evaluate(ctx: AttackContext, which: str, texts: Sequence[str], steps: int, lr: float,
                           batch: int, data=None, before: bool = False) -> tuple[dict, dict | None, float]:
    """Fine-tune a fresh copy of ``which`` on ``texts``; (metrics after, metrics before or None, seconds).

    Both evaluations go through the evaluation memo, keyed by the training texts and settings: the
    base's (the control row) is the same for every modified model. A model is loaded only when an
    evaluation has to run; the seconds are those the evaluations took when they ran.
    """
    from unlearn_lens.eval_memo import texts_hash
    from unlearn_lens.relearn import relearn_condition

    loaded: list = []

    def model_and_tokenizer():
        if not loaded:
            model, tokenizer = ctx.load(which)
            dtype = next(model.parameters()).dtype
            if str(dtype) != "torch.float32":
                ctx.progress(f"WARNING: relearning in {str(dtype)[6:]} weights rounds away updates much smaller than "
                             "the weights; use --dtype float32")
            loaded.extend((model, tokenizer))
        return loaded

    def evaluate_start() -> dict:
        model, tokenizer = model_and_tokenizer()
        reference = ctx.reference.get(which)
        if reference and data is not None and (data.forget, data.retain) == (ctx.data.forget, ctx.data.retain):
            # the same texts as the unattacked reference: its NLLs are this evaluation's; score the questions only
            questions = ctx.evaluate(model, tokenizer, dataclasses.replace(data, forget=[], retain=[]))
            return {**questions, **{m: reference[m] for m in ("forget_nll", "retain_nll", "retain_ppl")},
                    "n_forget_texts": len(data.forget), "n_retain_texts": len(data.retain)}
        return ctx.evaluate(model, tokenizer, data)

    def finetune_and_evaluate() -> dict:
        model, tokenizer = model_and_tokenizer()  # untouched: the start evaluation (if any) ran before
        rows = relearn_condition(model, tokenizer, list(texts), steps=steps, lr=lr, batch_size=batch,
                                 max_length=ctx.settings.max_length, seed=ctx.settings.seed, eval_every=steps,
                                 evaluate_fn=lambda m: ctx.evaluate(m, tokenizer, data), start_eval={})
        return {k: v for k, v in rows[-1].items() if k != "step"}

    seconds, start = 0.0, None
    if before:
        start, seconds = ctx.memoised(which, None, evaluate_start, data, what=f"the unattacked {which} model")
    transform = {"attack": "finetune", "texts": texts_hash(texts), "steps": steps, "lr": lr, "batch_size": batch,
                 "max_length": ctx.settings.max_length, "seed": ctx.settings.seed}
    after, after_seconds = ctx.memoised(which, transform, finetune_and_evaluate, data,
                                        what=f"the {which} model fine-tuned on {len(texts)} texts")
    loaded.clear()
    return ({m: after[m] for m in METRICS}, ({m: start[m] for m in METRICS} if start else None),
            seconds + after_seconds)


def run_unrelated(ctx: AttackContext) -> list[AttackResult]:
    """Fine-tune on ``relearn_examples`` retain-pool texts, on the modified model and on the base."""
    from unlearn_lens.relearn import attack_subset

    n, steps, lr, batch = _check_options(ctx)
    texts = attack_subset(ctx.data.retain_pool, n, ctx.settings.seed)
    if not texts:
        raise UserError(f"{ctx.settings.data}: retain.txt leaves no text for relearn-unrelated "
                        "(it needs at least 2 distinct texts: half are measured, the rest are the pool)")
    check_no_leak(texts, ctx.data.items, what="relearn-unrelated")
    setting = f"n={len(texts)},steps={steps},lr={lr:g}"
    results = []
    for target, which in TARGETS:
        ctx.progress(f"relearn-unrelated {setting}: {target}")
        metrics, _, seconds = _finetune_and_evaluate(ctx, which, texts, steps, lr, batch)
        results.append(AttackResult("relearn-unrelated", setting, target, metrics, seconds,
                                    extra={"n_examples": len(texts), "steps": steps, "lr": lr}))
    return results


def run_heldout(ctx: AttackContext) -> list[AttackResult]:
    """Fine-tune on half the evaluation questions' facts, evaluate on the other half (split recorded)."""
    _, steps, lr, batch = _check_options(ctx)
    train, held = heldout_split(ctx.data.items, ctx.settings.seed)
    texts = [fact_text(item) for item in train]
    check_no_leak(texts, held, train_ids=[item.id for item in train], what="relearn-heldout")
    ctx.attack_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.attack_dir / SPLIT_FILE, {
        "seed": ctx.settings.seed, "method": f"rank ids by sha256('{_SPLIT_SALT}:<seed>:<id>'); first n//2 train",
        "train_ids": [str(item.id) for item in train], "eval_ids": [str(item.id) for item in held]})
    data = dataclasses.replace(ctx.data, items=list(held))
    setting = f"n={len(texts)},steps={steps},lr={lr:g}"
    runs, reference = [], {}
    for target, which in TARGETS:
        ctx.progress(f"relearn-heldout {setting}: {target}")
        metrics, before, seconds = _finetune_and_evaluate(ctx, which, texts, steps, lr, batch, data, before=True)
        reference[which] = before
        runs.append((target, metrics, seconds))
    return [AttackResult("relearn-heldout", setting, target, metrics, seconds, reference=reference,
                         extra={"n_examples": len(texts), "n_eval_questions": len(held), "steps": steps, "lr": lr})
            for target, metrics, seconds in runs]
