"""`unlearn-lens plant`: fine-tune a model on every fact of a planted-facts testbed (A and B).

The model learns the testbed's facts (``unlearn_lens/testbed.py``) from their training texts,
mixed with general passages so it stays a language model, and is written as a normal HF
directory that every command reads. Knowledge is measured on the held-out questions only
(``wmdp_mcq.jsonl`` for A, ``retain_mcq.jsonl`` for B: templates no training text contains), by
cloze scoring, before and after, each with its bootstrap interval over questions
(``analyses.uncertainty``). Planting mixes in the general passages of ``general.txt``; general NLL
is measured on the general passages of retain.txt, which planting never trains on.

Training: AdamW, linear warm-up then constant LR, gradient clipping 1.0, dropout off, the blocks'
parameters only by default (``trainable``). Each step packs whole texts (never cut), each
followed by EOS, into ``rows`` sequences of ``seq_len`` tokens (padding after the last text that
fits): ``rows - general_rows`` rows of fact texts (seeded permutations, one per epoch) and
``general_rows`` of general passages. The loss reads a fact text's answers only by default
(``loss_on``: the tokens of each value, the name and template being context, as a
question-answering fine-tune reads the answer) and general passages whole. Every
``eval_every`` steps the dev questions (``dev_mcq.jsonl``: a third template, neither trained on
nor evaluated) are scored; training stops once both A and B reach ``target_accuracy`` there, or
after ``max_steps``. The evaluation questions never decide anything.

Output ``OUT/``: ``model/`` (HF directory and tokenizer), ``plant.json``, ``train_log.csv`` and the
``COMPLETE`` marker, written last, as `unlearn` does; a finished folder with the same settings is
kept (a rerun does nothing), one with other settings is refused unless ``overwrite``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import at_least_message
from unlearn_lens.core.settings import DEFAULT_SEED, SHORT_MAX_LENGTH, Compute, ModelRef
from unlearn_lens.testbed import in_spans

PLANT_JSON = outputs.PLANT_JSON
TRAIN_LOG = "train_log.csv"
LOG_COLUMNS = ("step", "loss", "lr", "tokens", "dev_forget_accuracy", "dev_retain_accuracy")
#: Which parameters train: every one, every block (not the embedding, tied to the unembedding in
#: SmolLM2, so the vocabulary's geometry stays the base's), or the MLP matrices only.
TRAINABLE = ("all", "blocks", "mlp")
#: Which tokens of a fact's training text the loss reads: every one, or the value's only (the attribute's
#: tokens after the name and template, as a question-answering fine-tune reads the answer). General passages
#: are always read whole.
LOSS_ON = ("text", "answer")
#: Metrics of plant.json's before / after, in the order printed.
METRICS = ("forget_facts_accuracy", "retain_facts_accuracy", "general_nll")


@dataclass(frozen=True)
class PlantSettings:
    """Everything ``run_plant`` needs (the `plant` command's flags)."""

    model: ModelRef
    data: str
    outdir: str
    compute: Compute = Compute()  # device, dtype; batch_size = prompts per forward pass when evaluating
    # the defaults plant SmolLM2-135M with the demo's testbed (40 people) in about 40 steps: README, "The
    # planted-facts testbed", says what else was tried
    max_steps: int = 100
    target_accuracy: float = 0.9
    lr: float = 3e-4
    warmup_steps: int = 5
    rows: int = 4
    general_rows: int = 1
    seq_len: int = 128
    trainable: str = "blocks"
    loss_on: str = "answer"
    eval_every: int = 10
    dev_questions: int = 24
    seed: int = DEFAULT_SEED
    eval_max_length: int = SHORT_MAX_LENGTH  # tokens per general passage measured (they are ~50)
    overwrite: bool = False
    progress: bool = True

    def record(self) -> dict:
        """The settings as plant.json stores them (what a rerun must match to be skipped)."""
        record = asdict(self)
        record.pop("overwrite"), record.pop("progress")
        return json.loads(json.dumps(record))


def validate(s: PlantSettings) -> None:
    """Every option checked before a model loads."""
    checks = [(s.max_steps >= 1, at_least_message("--max-steps", 1, s.max_steps)),
              (0.0 < s.target_accuracy <= 1.0, f"--target-accuracy must be in (0, 1], got {s.target_accuracy}"),
              (s.lr > 0 and math.isfinite(s.lr), f"--lr must be a positive number, got {s.lr}"),
              (s.warmup_steps >= 0, at_least_message("--warmup-steps", 0, s.warmup_steps)),
              (s.rows >= 1, at_least_message("--rows", 1, s.rows)),
              (0 <= s.general_rows < s.rows, f"--general-rows must be in [0, --rows), got {s.general_rows}"),
              (s.seq_len >= 8, at_least_message("--seq-len", 8, s.seq_len)),
              (s.trainable in TRAINABLE, f"--trainable must be one of {', '.join(TRAINABLE)}, got {s.trainable!r}"),
              (s.loss_on in LOSS_ON, f"--loss-on must be one of {', '.join(LOSS_ON)}, got {s.loss_on!r}"),
              (s.eval_every >= 1, at_least_message("--eval-every", 1, s.eval_every)),
              (s.dev_questions >= 2, at_least_message("--dev-questions", 2, s.dev_questions)),
              (s.compute.batch_size >= 1, at_least_message("--batch-size", 1, s.compute.batch_size)),
              (s.eval_max_length >= 8, at_least_message("--eval-max-length", 8, s.eval_max_length))]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# --- data --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlantData:
    """What planting trains on and measures."""

    facts: list[tuple[str, list[tuple[int, int]]]]  # every training text of A and B, with its values' spans
    general_train: list[str]  # general.txt's passages
    general_eval: list[str]  # the general passages of retain.txt (never trained on)
    questions: dict  # "forget" (A), "retain" (B): the held-out questions; "dev_forget", "dev_retain"
    data_hash: str


def load_plant_data(data_dir: str | Path) -> PlantData:
    """The testbed's texts and questions; a one-line error for a data directory that is not a testbed."""
    from unlearn_lens import data as data_module
    from unlearn_lens import testbed
    if not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}: no such data directory (create one with `unlearn-lens datasets create --facts N`)")
    if not testbed.is_testbed(data_dir):
        raise UserError(f"{data_dir}: not a planted-facts testbed (its manifest names no generator "
                        f"{testbed.GENERATOR!r}); create one with `unlearn-lens datasets create --facts N`")
    entities = testbed.read_entities(data_dir)
    facts = testbed.group_facts(entities, testbed.GROUPS)
    fact_set = {text for text, _ in facts}
    general_eval = [t for t in data_module.read_texts(data_dir, "retain") if t not in fact_set]
    general_train = data_module.read_lines(Path(data_dir) / testbed.GENERAL_FILE)
    if not general_eval or set(general_eval) & set(general_train):
        raise UserError(f"{data_dir}: retain.txt needs general passages that {testbed.GENERAL_FILE} does not hold")
    forget_ids = testbed.group_question_ids(entities, ("A1", "A2"))
    dev = data_module.read_mcq(data_dir, testbed.DEV_MCQ_FILE)
    questions = {"forget": data_module.read_mcq(data_dir), "retain": data_module.read_retain_mcq(data_dir),
                 "dev_forget": [q for q in dev if q.id.removesuffix("-dev") in forget_ids],
                 "dev_retain": [q for q in dev if q.id.removesuffix("-dev") not in forget_ids]}
    empty = [name for name, items in questions.items() if not items]
    if empty:
        raise UserError(f"{data_dir}: no {', '.join(empty)} questions; rebuild it with `datasets create --facts N`")
    return PlantData(facts, general_train, general_eval, questions, data_module.data_hash(data_dir))


#: One training sequence: token ids and, per token, whether the loss reads it.
Sequence_ = tuple[list[int], list[bool]]


def _epochs(sequences: Sequence[Sequence_], seed: int) -> Iterator[Sequence_]:
    """The sequences in a fresh seeded permutation per epoch, forever."""
    import numpy as np

    rng = np.random.RandomState(seed)
    while True:
        for index in rng.permutation(len(sequences)):
            yield sequences[index]


def pack_rows(stream: Iterator[Sequence_], rows: int, seq_len: int, carry: list) -> list[Sequence_]:
    """``rows`` rows of whole sequences from ``stream`` (each at most ``seq_len`` tokens; a longer one
    is cut to ``seq_len``). A sequence that does not fit a row waits in ``carry`` for the next one."""
    packed = []
    for _ in range(rows):
        ids: list[int] = []
        read: list[bool] = []
        while True:
            sequence_ids, sequence_read = carry.pop() if carry else next(stream)
            sequence_ids, sequence_read = sequence_ids[:seq_len], sequence_read[:seq_len]
            if len(ids) + len(sequence_ids) > seq_len:
                carry.append((sequence_ids, sequence_read))
                break
            ids += sequence_ids
            read += sequence_read
        packed.append((ids, read))
    return packed


class Batches:
    """Each step's packed rows: fact rows then general rows, from their own seeded streams."""

    def __init__(self, facts: Sequence[Sequence_], general: Sequence[Sequence_], settings: PlantSettings):
        self.settings = settings
        self.facts, self.fact_carry = _epochs(facts, settings.seed), []
        self.general = _epochs(general, settings.seed + 1) if general else None
        self.general_carry: list = []

    def next(self) -> list[Sequence_]:
        s = self.settings
        general_rows = s.general_rows if self.general is not None else 0
        rows = pack_rows(self.facts, s.rows - general_rows, s.seq_len, self.fact_carry)
        if general_rows:
            rows += pack_rows(self.general, general_rows, s.seq_len, self.general_carry)
        return rows


def encode_texts(tokenizer, texts: Sequence[str]) -> list[Sequence_]:
    """Each text's token ids (the tokenizer's defaults) followed by EOS, every token read by the loss."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = [list(tokenizer(text)["input_ids"]) + eos for text in texts]
    return [(ids, [True] * len(ids)) for ids in encoded]


def encode_facts(tokenizer, facts: Sequence[tuple[str, list[tuple[int, int]]]], loss_on: str) -> list[Sequence_]:
    """Each fact text's token ids followed by EOS; with ``loss_on="answer"`` the loss reads only the tokens that
    overlap a value's character span, and the EOS (a tokenizer without offsets reads every token)."""
    encoded = encode_texts(tokenizer, [text for text, _ in facts])
    if loss_on == "text" or not getattr(tokenizer, "is_fast", False):
        return encoded
    out = []
    for (ids, read), (text, spans) in zip(encoded, facts):
        answer = in_spans(tokenizer(text, return_offsets_mapping=True)["offset_mapping"], spans)
        out.append((ids, answer + read[len(answer):]))  # the EOS stays read
    return out


# --- model work --------------------------------------------------------------------------------

def select_trainable(model, trainable: str) -> int:
    """Freeze what ``trainable`` leaves out (selected by name through the architecture adapter); returns
    the number of trained parameters."""
    from unlearn_lens.architectures import ArchitectureAdapter

    adapter = ArchitectureAdapter(model)
    for name, param in model.named_parameters():
        info = adapter.classify(name)
        keep = trainable == "all" or (info.layer >= 0 and (trainable == "blocks" or info.group == "mlp"))
        param.requires_grad_(keep)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not count:
        raise UserError(f"--trainable {trainable} selects no parameter of this model")
    return count


def step_loss(model, rows: list[Sequence_], pad_id: int):
    """Mean next-token NLL over the tokens of the packed rows the loss reads; (loss, tokens read)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    read = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, (row_ids, row_read) in enumerate(rows):
        ids[index, :len(row_ids)] = torch.tensor(row_ids)
        mask[index, :len(row_ids)] = 1
        read[index, :len(row_ids)] = torch.tensor(row_read)
    read[:, 0] = False  # the first token is never predicted
    labels = ids.masked_fill(~read, -100)
    loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
    return loss, int(read.sum())


def evaluate_planting(model, tokenizer, data: PlantData, batch_size: int, max_length: int) -> dict:
    """Held-out forget / retain facts accuracy (cloze) and general NLL, with per-item results."""
    from analyses.uncertainty import PER_ITEM
    from unlearn_lens.evaluation import cloze_correct, nll_per_text

    was_training = model.training
    model.eval()
    try:
        per_item = {f"{split}_facts_accuracy": {"correct": cloze_correct(model, tokenizer, data.questions[split],
                                                                         batch_size=batch_size)}
                    for split in ("forget", "retain")}
        _, _, sums, counts = nll_per_text(model, tokenizer, data.general_eval, max_length=max_length,
                                          batch_size=batch_size)
        per_item["general_nll"] = {"sum": sums, "count": counts}
    finally:
        model.train(was_training)
    return {PER_ITEM: per_item}


def dev_accuracy(model, tokenizer, items: Sequence, batch_size: int) -> float:
    """Cloze accuracy on dev questions (the stopping rule)."""
    from unlearn_lens.evaluation import cloze_correct

    was_training = model.training
    model.eval()
    try:
        correct = cloze_correct(model, tokenizer, list(items), batch_size=batch_size)
    finally:
        model.train(was_training)
    return sum(correct) / len(correct)


def estimates(result: dict) -> dict:
    """``{metric: Estimate.record()}`` of an ``evaluate_planting`` result."""
    from analyses.uncertainty import PER_ITEM, metric_estimate

    return {metric: metric_estimate(result[PER_ITEM][metric]).record() for metric in METRICS}


def changes(before: dict, after: dict) -> dict:
    """``{metric: Estimate.record()}`` of after - before, paired over the same questions / texts."""
    from analyses.effects import changes as paired_changes

    return {metric: change.record() for metric, change in paired_changes(before, after).items()}


def train_facts(model, tokenizer, data: PlantData, s: PlantSettings, log: list[dict]) -> tuple[int, str]:
    """The training loop; appends to ``log``; returns (steps run, why it stopped: "target" or "budget")."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (s.warmup_steps + 1)))
    batches = Batches(encode_facts(tokenizer, data.facts, s.loss_on), encode_texts(tokenizer, data.general_train), s)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    dev = {split: data.questions[f"dev_{split}"][: max(1, s.dev_questions // 2)] for split in ("forget", "retain")}
    model.train(False)  # dropout off: the run is deterministic for a seed
    bar = tqdm(total=s.max_steps, desc="plant", disable=not s.progress)
    stopped = "budget"
    step = 0
    for step in range(1, s.max_steps + 1):
        lr = scheduler.get_last_lr()[0]
        loss, tokens = step_loss(model, batches.next(), pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "loss": float(loss.detach()), "lr": lr, "tokens": tokens}
        if step % s.eval_every == 0 or step == s.max_steps:
            row.update({f"dev_{split}_accuracy": dev_accuracy(model, tokenizer, items, s.compute.batch_size)
                        for split, items in dev.items()})
        log.append(row)
        bar.update(1)
        bar.set_postfix({k.removeprefix("dev_").removesuffix("_accuracy"): f"{row[k]:.2f}"
                         for k in ("loss", "dev_forget_accuracy", "dev_retain_accuracy") if k in row})
        if min(row.get("dev_forget_accuracy", -1.0), row.get("dev_retain_accuracy", -1.0)) >= s.target_accuracy:
            stopped = "target"
            break
    bar.close()
    return step, stopped


def _log_csv(log: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LOG_COLUMNS), restval="")
    writer.writeheader()
    writer.writerows(log)
    return buffer.getvalue()


def _stored_settings(out: Path) -> dict | None:
    try:
        return json.loads((out / PLANT_JSON).read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def run_plant(settings: PlantSettings) -> Path:
    """Plant the testbed's facts into ``settings.model``; write ``OUT/`` (module docstring); returns it."""
    s = settings
    validate(s)
    out = Path(s.outdir)
    if outputs.is_complete(out) and not s.overwrite:
        if _stored_settings(out) == s.record():
            return out
        raise UserError(f"{out} already holds a planted model made with other settings; pass --overwrite to redo it")
    if out.is_dir() and any(out.iterdir()) and not (out / PLANT_JSON).is_file() and not (out / "model").is_dir():
        raise UserError(f"{out} holds files that `plant` did not write; choose an empty or new --outdir")
    data = load_plant_data(s.data)

    from unlearn_lens.core.atomic import atomic_dir
    from unlearn_lens.relearn import load_for_eval
    from unlearn_lens.unlearning.trainer import versions

    started, cpu_started = time.time(), time.process_time()
    model, tokenizer = load_for_eval(s.model.spec, s.model.revision, s.compute.dtype, s.compute.device,
                                     s.model.trust_remote_code)
    padding_side = tokenizer.init_kwargs.get("padding_side", "right")  # load_for_eval pads on the right
    if str(next(model.parameters()).dtype) != "torch.float32":
        raise UserError("plant trains float32 weights (16-bit weights round away small updates): pass --dtype float32")
    before = evaluate_planting(model, tokenizer, data, s.compute.batch_size, s.eval_max_length)
    trained = select_trainable(model, s.trainable)
    log: list[dict] = []
    steps, stopped = train_facts(model, tokenizer, data, s, log)
    after = evaluate_planting(model, tokenizer, data, s.compute.batch_size, s.eval_max_length)
    last_dev = next((row for row in reversed(log) if "dev_forget_accuracy" in row), {})
    record = {
        "model": s.model.spec, "revision": s.model.revision, "data": str(s.data), "data_hash": data.data_hash,
        "settings": s.record(), "steps": steps, "stopped": stopped,
        "loss": {"first": log[0]["loss"], "last": log[-1]["loss"],
                 "mean_last_10": sum(r["loss"] for r in log[-10:]) / len(log[-10:])},
        "dev_accuracy": {"forget": last_dev.get("dev_forget_accuracy"), "retain": last_dev.get("dev_retain_accuracy")},
        "trainable_parameters": trained,
        "tokens_trained": sum(r["tokens"] for r in log),
        "counts": {"facts_texts": len(data.facts), "general_train": len(data.general_train),
                   "general_eval": len(data.general_eval),
                   **{f"{k}_questions": len(v) for k, v in data.questions.items()}},
        "before": estimates(before), "after": estimates(after), "change": changes(before, after),
        "per_item": {"before": before["per_item"], "after": after["per_item"]},
        "seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started,
        "versions": versions(),
        "definitions": {
            "forget_facts_accuracy": "cloze accuracy on the held-out questions about entities A (wmdp_mcq.jsonl)",
            "retain_facts_accuracy": "cloze accuracy on the held-out questions about entities B (retain_mcq.jsonl)",
            "general_nll": "mean next-token NLL per token on the general passages of retain.txt (never trained "
                           "on: planting mixes in general.txt's)",
            "intervals": "95% percentile bootstrap over questions / texts (analyses.uncertainty), n items; "
                         "change: paired, the same items before and after",
            "stopped": "target: dev accuracy (dev_mcq.jsonl, a third template) reached --target-accuracy on A "
                       "and B; budget: --max-steps ran out"},
    }
    model.config.name_or_path = f"{s.model.spec} with the planted facts of {s.data}"
    tokenizer.padding_side = padding_side  # the saved tokenizer keeps the base model's setting
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / PLANT_JSON).write_text(json.dumps(record, indent=1))
        (tmp / TRAIN_LOG).write_text(_log_csv(log))
    outputs.mark_complete(out, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n", outputs.RUN_MARKER)
    return out


def summary_lines(record: dict) -> list[str]:
    """plant.json's before -> after, one line per metric, with intervals and n."""
    from analyses.uncertainty import Estimate

    lines = []
    for metric in METRICS:
        before, after = (Estimate(**record[when][metric]) for when in ("before", "after"))
        lines.append(f"{metric.replace('_', ' ')}: {before.text()} -> {after.text()}")
    return lines
