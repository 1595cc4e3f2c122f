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
  both unattacked models' metrics on that half as their reference. On a planted-facts testbed
  (``unlearn_lens/testbed.py``) the split is the data's own, by entity, as in Deeb & Roger: it
  fine-tunes on the training texts of entities A1 and evaluates on the held-out questions about
  A2 (``heldout_split.json`` says which). Each question's correctness in the four evaluations (base
  and modified, before and after) goes to ``attacks/heldout_per_item.json``, from which the
  recovery's interval is computed (``analyses.uncertainty.recovery_estimate``).

Both run on the base too (the control row). The evaluation-leak guard: no question an attack is
evaluated on may be in its training text, checked by id and by normalised text; a run that
would break it is refused before any model loads.

``relearn_preset``: ``original`` (full fine-tuning, constant AdamW learning rate
``relearn_lr``, ``relearn_steps`` steps of ``relearn_batch_size`` texts) or ``reference``, Lucki
et al.'s fine-tuning (ethz-spylab/unlearning-vs-safety ``src/finetuning/finetune.py``): LoRA rank
128, alpha 16, dropout 0 on every attention and MLP matrix, AdamW lr 2e-4, weight decay 0.01, a
linear schedule with 5 % warm-up, batch 1, 3 epochs (so 3 x the number of texts steps), gradient
norm clipped at 1 (the HF Trainer's default), on 10 texts for ``relearn-unrelated``. Options
given explicitly override the preset. Deviations from the reference: the texts are fed as they
are, not wrapped in its chat template ("Write a wikipedia article." and a reply prefix), at the
attack's ``--max-length`` (the reference: 1024); the data order is this module's seeded
permutation per epoch rather than the Trainer's sampler; the model is held in ``--dtype``
(the reference: bfloat16).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Iterable, Sequence

from analyses.io import atomic_write_json
from analyses.uncertainty import PER_ITEM
from unlearn_lens.attacks.base import AttackContext, AttackResult, evaluation_record, metric_values, per_item_values
from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_at_least

#: This module's options (``AttackSettings.options``) and their defaults.
ATTACK_OPTIONS = {
    "relearn_preset": "original",  # or "reference": Lucki et al.'s LoRA fine-tuning (see PRESETS)
    "relearn_examples": 10,     # unrelated texts fine-tuned on (relearn-unrelated)
    "relearn_steps": 20,        # optimizer steps of each relearning control (reference: 3 epochs)
    "relearn_lr": 1e-5,         # AdamW learning rate (constant), as `unlearn-lens relearn`
    "relearn_batch_size": 4,    # texts per step
}
#: Training settings per preset (``relearn_condition``'s keywords, plus ``epochs`` and the options they fix).
PRESETS: dict[str, dict] = {
    "original": {"lora": False, "weight_decay": 0.0, "schedule": "constant", "warmup_ratio": 0.0, "epochs": None},
    # ethz-spylab/unlearning-vs-safety src/finetuning/finetune.py: LORA_RANK 128, LORA_ALPHA 16, LORA_DROPOUT 0,
    # BATCH_SIZE 1, GRAD_ACCUM_STEPS 1, EPOCHS 3, LR 2e-4, WARMUP_RATIO 0.05, WEIGHT_DECAY 0.01, "linear", adamw_torch
    "reference": {"lora": True, "lora_r": 128, "lora_alpha": 16.0, "lora_dropout": 0.0, "weight_decay": 0.01,
                  "schedule": "linear", "warmup_ratio": 0.05, "epochs": 3,
                  "options": {"relearn_examples": 10, "relearn_lr": 2e-4, "relearn_batch_size": 1}},
}
SPLIT_FILE = "heldout_split.json"
#: Per-question correctness of relearn-heldout's evaluations (base / modified, before / after).
PER_ITEM_FILE = outputs.HELDOUT_PER_ITEM_JSON
_SPLIT_SALT = "unlearn-lens/relearn-heldout"
#: Normalised questions shorter than this are not searched for (too generic to be a leak).
MIN_LEAK_CHARS = 12
TARGETS = (("modified", "modified"), ("control", "base"))  # (row target, model loaded)


def _option(ctx: AttackContext, name: str):
    """An option given explicitly, else the preset's value, else the default."""
    if name in ctx.settings.options:
        return ctx.settings.options[name]
    if name != "relearn_preset":
        fixed = PRESETS.get(str(_option(ctx, "relearn_preset")), {}).get("options", {})
        if name in fixed:
            return fixed[name]
    return ATTACK_OPTIONS[name]


def _check_options(ctx: AttackContext) -> tuple[int, int, float, int]:
    """(examples, steps, lr, batch size), read as numbers (the command line gives strings) and checked.

    Under a preset with epochs (``reference``), ``steps`` is the number of steps of one epoch's
    worth of examples; ``_training`` multiplies it out for the texts actually used.
    """
    preset = str(_option(ctx, "relearn_preset"))
    if preset not in PRESETS:
        raise UserError(f"relearn_preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    values = {}
    for key, default in ATTACK_OPTIONS.items():
        if key == "relearn_preset":
            continue
        raw = _option(ctx, key)
        try:
            values[key] = type(default)(float(raw)) if isinstance(default, int) else float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{key} must be a number, got {raw!r}") from None
        if isinstance(default, int):
            check_at_least(key, values[key], 1)
    if not values["relearn_lr"] > 0:
        raise UserError(f"relearn_lr must be a positive number, got {values['relearn_lr']}")
    return (values["relearn_examples"], values["relearn_steps"], values["relearn_lr"], values["relearn_batch_size"])


def _training_of(preset: str) -> dict:
    """A preset's ``relearn_condition`` keywords without the step-dependent warm-up."""
    return {k: v for k, v in PRESETS[preset].items() if k not in ("options", "epochs", "warmup_ratio")} | \
        {"warmup_steps": 0}


def _training(ctx: AttackContext, n_texts: int, steps: int, batch: int) -> tuple[int, dict]:
    """(steps, ``relearn_condition`` keywords) of the preset for ``n_texts`` texts.

    With epochs (``reference``) and no explicit ``relearn_steps``, steps = epochs x ceil(texts / batch);
    the warm-up is ``ceil(warmup_ratio x steps)``, as the HF Trainer rounds it.
    """
    name = str(_option(ctx, "relearn_preset"))
    epochs, ratio = PRESETS[name]["epochs"], PRESETS[name]["warmup_ratio"]
    if epochs and "relearn_steps" not in ctx.settings.options:
        steps = epochs * math.ceil(n_texts / batch)
    return steps, {**_training_of(name), "warmup_steps": math.ceil(ratio * steps)}


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
                           batch: int, data=None, before: bool = False,
                           training: dict | None = None) -> tuple[dict, dict | None, float]:
    """Fine-tune a fresh copy of ``which`` on ``texts``; (evaluation after, evaluation before or None, seconds),
    each evaluation METRICS' values with their per-item results (``evaluation_record``).

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
            nlls = ("forget_nll", "forget_value_nll", "retain_nll")
            per_item = {**(questions.get(PER_ITEM) or {}),
                        **{m: v for m, v in (reference.get(PER_ITEM) or {}).items() if m in nlls}}
            return {**questions, **{m: reference[m] for m in (*nlls, "retain_ppl")},
                    "n_forget_texts": len(data.forget), "n_retain_texts": len(data.retain), PER_ITEM: per_item}
        return ctx.evaluate(model, tokenizer, data)

    def finetune_and_evaluate() -> dict:
        model, tokenizer = model_and_tokenizer()  # untouched: the start evaluation (if any) ran before
        rows = relearn_condition(model, tokenizer, list(texts), steps=steps, lr=lr, batch_size=batch,
                                 max_length=ctx.settings.max_length, seed=ctx.settings.seed, eval_every=steps,
                                 evaluate_fn=lambda m: ctx.evaluate(m, tokenizer, data), start_eval={},
                                 **(training or {}))
        return {k: v for k, v in rows[-1].items() if k != "step"}

    seconds, start = 0.0, None
    if before:
        start, seconds = ctx.memoised(which, None, evaluate_start, data, what=f"the unattacked {which} model")
    transform = {"attack": "finetune", "texts": texts_hash(texts), "steps": steps, "lr": lr, "batch_size": batch,
                 "max_length": ctx.settings.max_length, "seed": ctx.settings.seed}
    if training and training != _training_of("original"):
        transform["training"] = training  # the original preset keeps its keys (and stored evaluations)
    after, after_seconds = ctx.memoised(which, transform, finetune_and_evaluate, data,
                                        what=f"the {which} model fine-tuned on {len(texts)} texts")
    loaded.clear()
    return evaluation_record(after), (evaluation_record(start) if start else None), seconds + after_seconds


def run_unrelated(ctx: AttackContext) -> list[AttackResult]:
    """Fine-tune on ``relearn_examples`` retain-pool texts, on the modified model and on the base."""
    from unlearn_lens.relearn import attack_subset

    n, steps, lr, batch = _check_options(ctx)
    texts = attack_subset(ctx.data.retain_pool, n, ctx.settings.seed)
    if not texts:
        raise UserError(f"{ctx.settings.data}: retain.txt leaves no text for relearn-unrelated "
                        "(it needs at least 2 distinct texts: half are measured, the rest are the pool)")
    check_no_leak(texts, ctx.data.items, what="relearn-unrelated")
    steps, training = _training(ctx, len(texts), steps, batch)
    setting = _setting(ctx, len(texts), steps, lr)
    results = []
    for target, which in TARGETS:
        ctx.progress(f"relearn-unrelated {setting}: {target}")
        metrics, _, seconds = _finetune_and_evaluate(ctx, which, texts, steps, lr, batch, training=training)
        results.append(AttackResult("relearn-unrelated", setting, target, metric_values(metrics), seconds,
                                    extra={"n_examples": len(texts), "steps": steps, "lr": lr,
                                           "preset": str(_option(ctx, "relearn_preset"))},
                                    per_item=per_item_values(metrics)))
    return results


def _setting(ctx: AttackContext, n: int, steps: int, lr: float) -> str:
    """The rows' setting label; the reference preset says so (its rows are not the original's)."""
    preset = str(_option(ctx, "relearn_preset"))
    return f"n={n},steps={steps},lr={lr:g}" + ("" if preset == "original" else f",preset={preset}")


def entity_split(ctx: AttackContext) -> tuple[list[str], list, list[str], dict] | None:
    """On a planted-facts testbed: (A1's training texts, the held-out questions about A2, A1's question ids,
    the split's record); None for any other data."""
    from unlearn_lens import testbed
    from unlearn_lens.data import read_mcq

    data_dir = ctx.settings.data
    if not testbed.is_testbed(data_dir):
        return None
    entities = testbed.read_entities(data_dir)
    eval_ids = testbed.group_question_ids(entities, ("A2",))
    held = [item for item in read_mcq(data_dir) if item.id in eval_ids][: ctx.settings.max_samples or None]
    train_ids = sorted(testbed.group_question_ids(entities, ("A1",)))
    record = {"split": "entity (planted-facts testbed)", "train": "training texts of entities A1",
              "evaluate": "held-out questions about entities A2",
              "train_entities": [e.id for e in entities if e.group == "A1"],
              "eval_entities": [e.id for e in entities if e.group == "A2"],
              "train_ids": train_ids, "eval_ids": [str(item.id) for item in held]}
    return testbed.group_texts(entities, ("A1",)), held, train_ids, record


def question_split(ctx: AttackContext) -> tuple[list[str], list, list[str], dict]:
    """(facts of half the evaluation questions, the other half, the first half's ids, the split's record)."""
    train, held = heldout_split(ctx.data.items, ctx.settings.seed)
    record = {"split": "question", "seed": ctx.settings.seed,
              "method": f"rank ids by sha256('{_SPLIT_SALT}:<seed>:<id>'); first n//2 train",
              "train_ids": [str(item.id) for item in train], "eval_ids": [str(item.id) for item in held]}
    return [fact_text(item) for item in train], held, [str(item.id) for item in train], record


def run_heldout(ctx: AttackContext) -> list[AttackResult]:
    """Fine-tune on held-out facts (A1's texts on a testbed, else half the questions' facts), evaluate on the
    other questions (A2's, else the other half); the split and the per-question results are recorded."""
    _, steps, lr, batch = _check_options(ctx)
    texts, held, train_ids, record = entity_split(ctx) or question_split(ctx)
    if not held:
        raise UserError(f"{ctx.settings.data}: relearn-heldout has no question to evaluate on")
    check_no_leak(texts, held, train_ids=train_ids, what="relearn-heldout")
    ctx.attack_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.attack_dir / SPLIT_FILE, record)
    data = dataclasses.replace(ctx.data, items=list(held))
    steps, training = _training(ctx, len(texts), steps, batch)
    setting = _setting(ctx, len(texts), steps, lr)
    runs, reference, per_item = [], {}, {"ids": [str(item.id) for item in held]}
    for target, which in TARGETS:
        ctx.progress(f"relearn-heldout {setting}: {target}")
        metrics, before, seconds = _finetune_and_evaluate(ctx, which, texts, steps, lr, batch, data, before=True,
                                                          training=training)
        reference[which] = before
        per_item[which] = {when: (result.get(PER_ITEM) or {}).get("cloze_accuracy")
                           for when, result in (("before", before), ("after", metrics))}
        runs.append((target, metrics, seconds))
    atomic_write_json(ctx.attack_dir / PER_ITEM_FILE, {
        "metric": "cloze_accuracy", "setting": setting, **per_item,
        "definitions": {"base": "the base model (the control: fine-tuned the same way)",
                        "modified": "the modified model", "before": "unattacked", "after": "fine-tuned",
                        "correct": "1 where the correct choice has the highest mean log-probability"}})
    return [AttackResult("relearn-heldout", setting, target, metric_values(metrics), seconds, reference=reference,
                         extra={"n_examples": len(texts), "n_eval_questions": len(held), "steps": steps, "lr": lr,
                                "preset": str(_option(ctx, "relearn_preset"))},
                         per_item=per_item_values(metrics))
            for target, metrics, seconds in runs]
