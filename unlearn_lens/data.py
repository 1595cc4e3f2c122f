"""The three data sets every step reads: forget texts, retain texts and held-out WMDP questions.

A data directory holds ``forget.txt`` and ``retain.txt`` (one text per line),
``wmdp_mcq.jsonl`` (question, four choices, answer index) and ``manifest.json`` (sources,
counts, content hashes, which questions went where). The evaluation questions are never
training text: WMDP-Bio is split deterministically into held-out questions (evaluation) and the
rest (forget training text), unless a separate forget corpus is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from unlearn_lens.core.atomic import atomic_write_text
from unlearn_lens.core.errors import UserError
from unlearn_lens.data_files import (DEMO_DIR, FILES, MANIFEST, RETAIN_MCQ_FILE, files_hash,  # noqa: F401 (data's names)
                                     sha256)


WMDP_HUB = ("cais/wmdp", "wmdp-bio", "test")
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")
FORGET_CORPUS_HUB = ("cais/wmdp-bio-forget-corpus", None, "train")


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


# --- reading -------------------------------------------------------------------------------

def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file, stripped; one-line errors for a missing or non-UTF-8 file."""
    return _read_lines(path)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: no such file (create the data with `unlearn-lens datasets create`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_texts(data_dir: str | Path, split: str) -> list[str]:
    """Texts of the ``forget`` or ``retain`` split, one per non-empty line."""
    if split not in ("forget", "retain"):
        raise UserError(f"unknown text split {split!r}; expected forget or retain")
    path = Path(data_dir) / FILES[split]
    texts = _read_lines(path)
    if not texts:
        raise UserError(f"{path}: empty data set (no non-empty lines)")
    return texts


def _parse_item(record: dict, where: str) -> MCQItem:
    try:
        choices = tuple(str(c) for c in record["choices"])
        answer = int(record["answer"])
        question = str(record["question"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: needs question, choices and answer ({exc})") from None
    if len(choices) != 4 or not 0 <= answer < 4:
        raise UserError(f"{where}: needs exactly 4 choices and an answer index in 0..3")
    return MCQItem(str(record.get("id", _question_id(question))), question, choices, answer)


def read_mcq(data_dir: str | Path, filename: str = FILES["wmdp"]) -> list[MCQItem]:
    """The held-out evaluation questions of ``wmdp_mcq.jsonl`` (or of another question file)."""
    path = Path(data_dir) / filename
    items = []
    for number, line in enumerate(_read_lines(path), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not valid JSON") from None
        items.append(_parse_item(record, f"{path}:{number}"))
    if not items:
        raise UserError(f"{path}: no questions")
    return items


def read_retain_mcq(data_dir: str | Path) -> list[MCQItem]:
    """The retain-set questions of ``retain_mcq.jsonl``; none when the data set has no such file."""
    return read_mcq(data_dir, RETAIN_MCQ_FILE) if (Path(data_dir) / RETAIN_MCQ_FILE).is_file() else []


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a data directory (``hash`` identifies the exact content)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{data_dir}: no {MANIFEST}; create the data with `unlearn-lens datasets create`")
    return json.loads(path.read_text(encoding="utf-8"))


def data_hash(data_dir: str | Path, echo=None) -> str:
    """The content hash of a data directory: its manifest's, or, for a researcher's own files
    without a manifest, the same hash computed from the data files present (said in one line)."""
    path = Path(data_dir) / MANIFEST
    if path.is_file():
        return str(read_manifest(data_dir).get("hash", ""))
    present = [name for name in FILES.values() if (Path(data_dir) / name).is_file()]
    if not present:
        raise UserError(f"{data_dir}: none of {', '.join(FILES.values())} (create the data with "
                        "`unlearn-lens datasets create`, or write your own forget.txt, retain.txt, wmdp_mcq.jsonl)")
    digest = files_hash({name: sha256(Path(data_dir) / name) for name in present})
    (echo or (lambda line: print(line, file=sys.stderr)))(
        f"{data_dir}: no {MANIFEST}; data hash {digest[:12]} is the SHA-256 of {', '.join(present)}")
    return digest


def warn_if_contaminated(train_texts: Iterable[str], items: Sequence[MCQItem]) -> bool:
    """Warn loudly (stderr) when evaluation questions appear inside training text; True if so."""
    corpus = "\n".join(train_texts)
    leaked = [item.id for item in items if len(item.question.strip()) >= 20 and item.question.strip() in corpus]
    if leaked:
        print(
            f"WARNING: {len(leaked)} of {len(items)} evaluation questions appear in the training text "
            f"(e.g. {', '.join(leaked[:3])}): accuracy on them measures memorisation of the training "
            "set, not knowledge. Rebuild the data with `unlearn-lens datasets create` (held-out split).",
            file=sys.stderr,
        )
    return bool(leaked)


# --- building ------------------------------------------------------------------------------

def _question_id(question: str) -> str:
    return "q-" + hashlib.sha256(question.strip().encode()).hexdigest()[:12]


def split_heldout(items: Sequence[MCQItem], eval_fraction: float, seed: int) -> tuple[list[MCQItem], list[MCQItem]]:
    """Deterministic held-out split by a seeded hash of each question (stable under reordering)."""
    if not 0.0 < eval_fraction <= 1.0:
        raise UserError(f"--eval-fraction must be in (0, 1], got {eval_fraction}")
    evaluation, training = [], []
    for item in items:
        digest = hashlib.sha256(f"{seed}:{item.question.strip()}".encode()).digest()
        (evaluation if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else training).append(item)
    return evaluation, training


def is_wikitext_body(line: str) -> bool:
    """WikiText lines worth keeping: non-empty and not a ``= Heading =`` line."""
    stripped = line.strip()
    return bool(stripped) and not (stripped.startswith("=") and stripped.endswith("="))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _load(kind_or_id: str, config: str | None = None, split: str = "train", **kwargs):
    from datasets import load_dataset

    try:
        return load_dataset(kind_or_id, config, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types for offline/gated/missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load data set {kind_or_id!r} ({config or 'default'}): {first}") from None


def _local_file(source_dir: Path, stem: str, kinds=("jsonl", "json", "parquet", "csv", "txt")) -> Path | None:
    for suffix in kinds:
        candidate = source_dir / f"{stem}.{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _load_local(path: Path):
    kind = {"jsonl": "json", "txt": "text"}.get(path.suffix[1:], path.suffix[1:])
    return _load(kind, None, "train", data_files=str(path))


def _collect_sources(source: str, source_dir: Path | None, forget_corpus: bool):
    """Rows of the WMDP questions, retain lines and (optionally) forget-corpus texts."""
    if source == "demo":
        mcq = [json.loads(line) for line in (DEMO_DIR / "mcq.jsonl").read_text().splitlines() if line.strip()]
        retain = (DEMO_DIR / "retain_passages.txt").read_text().splitlines()
        forget = (DEMO_DIR / "forget_passages.txt").read_text().splitlines()
        return mcq, retain, forget, {"mcq": "demo_data/mcq.jsonl", "retain": "demo_data/retain_passages.txt",
                                     "forget": "demo_data/forget_passages.txt"}
    if source == "local":
        assert source_dir is not None
        if not source_dir.is_dir():
            raise UserError(f"{source_dir}: no such source directory")
        wmdp_path = _local_file(source_dir, "wmdp_bio", ("jsonl", "json", "parquet"))
        retain_path = _local_file(source_dir, "wikitext", ("txt", "parquet", "jsonl"))
        if wmdp_path is None or retain_path is None:
            raise UserError(f"{source_dir}: needs wmdp_bio.jsonl|parquet (question, choices, answer) and "
                            "wikitext.txt|parquet (a text column); optional forget_corpus.jsonl|parquet|txt")
        mcq = list(_load_local(wmdp_path))
        retain = [row["text"] for row in _load_local(retain_path)]
        corpus_path = _local_file(source_dir, "forget_corpus") if forget_corpus else None
        if forget_corpus and corpus_path is None:
            raise UserError(f"{source_dir}: --forget-corpus needs forget_corpus.jsonl|parquet|txt")
        forget = [row["text"] for row in _load_local(corpus_path)] if corpus_path else None
        sources = {"mcq": str(wmdp_path), "retain": str(retain_path), "forget": str(corpus_path) if corpus_path else None}
        return mcq, retain, forget, sources
    token = os.environ.get("HF_TOKEN") or None
    mcq = list(_load(WMDP_HUB[0], WMDP_HUB[1], WMDP_HUB[2], token=token))
    retain = [row["text"] for row in _load(*WIKITEXT_HUB)]
    forget = None
    if forget_corpus:
        if token is None:
            raise UserError("--forget-corpus needs HF_TOKEN (in the environment or .env) with access to "
                            f"{FORGET_CORPUS_HUB[0]}")
        forget = [row.get("text") or row.get("abstract", "") for row in _load(*FORGET_CORPUS_HUB, token=token)]
    sources = {"mcq": "/".join(x for x in WMDP_HUB if x), "retain": "/".join(WIKITEXT_HUB),
               "forget": FORGET_CORPUS_HUB[0] if forget_corpus else None}
    return mcq, retain, forget, sources


def create_datasets(
    outdir: str | Path,
    *,
    source: str = "hub",
    source_dir: str | Path | None = None,
    eval_fraction: float = 0.5,
    seed: int = 0,
    forget_corpus: bool = False,
    max_retain: int | None = None,
) -> dict:
    """Write forget.txt, retain.txt, wmdp_mcq.jsonl and manifest.json (manifest last) into ``outdir``.

    ``source``: ``hub`` (datasets.load_dataset on cais/wmdp and WikiText-2), ``local`` (the same
    from files in ``source_dir``) or ``demo`` (the built-in offline set). Without a forget corpus,
    WMDP-Bio is split into held-out evaluation questions and training questions, whose text
    (question and correct answer) becomes the forget set. The demo's forget set is its passages,
    so all its questions are held out.
    """
    outdir = Path(outdir)
    mcq_rows, retain_lines, forget_texts, sources = _collect_sources(
        source, Path(source_dir) if source_dir else None, forget_corpus)
    items = [_parse_item(row, f"question {i}") for i, row in enumerate(mcq_rows)]
    if not items:
        raise UserError("the WMDP source holds no questions")
    if forget_texts is None:
        evaluation, training = split_heldout(items, eval_fraction, seed)
        forget = [_one_line(f"{item.question} {item.choices[item.answer]}") for item in training]
        forget_source = f"{sources['mcq']} (questions not held out, with their correct answer)"
    else:
        evaluation, training = list(items), []
        forget = [_one_line(text) for text in forget_texts if str(text).strip()]
        forget_source = sources["forget"]
    retain = [_one_line(line) for line in retain_lines if is_wikitext_body(line)]
    if max_retain:
        retain = retain[:max_retain]
    if not forget or not retain or not evaluation:
        raise UserError(f"empty split: forget={len(forget)} retain={len(retain)} evaluation={len(evaluation)}")
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is rewritten
    atomic_write_text(outdir / FILES["forget"], "\n".join(forget) + "\n")
    atomic_write_text(outdir / FILES["retain"], "\n".join(retain) + "\n")
    atomic_write_text(outdir / FILES["wmdp"], "".join(
        json.dumps({"id": it.id, "question": it.question, "choices": list(it.choices), "answer": it.answer}) + "\n"
        for it in evaluation))
    files = {name: sha256(outdir / name) for name in FILES.values()}
    manifest = {
        "format": 1,
        "source": source,
        "sources": {"forget": forget_source, "retain": sources["retain"], "wmdp": sources["mcq"]},
        "counts": {"forget": len(forget), "retain": len(retain), "wmdp_eval": len(evaluation),
                   "wmdp_train": len(training)},
        "files": files,
        "hash": files_hash(files),
        "heldout_split": {"eval_fraction": eval_fraction if forget_texts is None else 1.0,
                          "seed": seed, "method": "sha256(seed:question) < eval_fraction",
                          "eval_ids": [it.id for it in evaluation], "train_ids": [it.id for it in training]},
    }
    atomic_write_text(outdir / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


@dataclass(frozen=True)
class DatasetSettings:
    """Everything ``run_datasets`` needs (the `datasets create` command's flags)."""

    outdir: str
    source: str = "hub"  # hub, local (from source_dir), demo (built in, offline) or testbed (planted facts)
    source_dir: str | None = None
    eval_fraction: float = 0.5
    seed: int = 0
    forget_corpus: bool = False
    max_retain: int | None = None
    facts: int | None = None  # source "testbed": this many fictitious entities (unlearn_lens/testbed.py)


def run_datasets(settings: DatasetSettings) -> dict:
    """Write the data sets of ``settings``; returns the manifest."""
    s = settings
    if s.source == "testbed":
        from unlearn_lens.testbed import create_testbed

        if s.facts is None:
            raise UserError("the planted-facts testbed needs --facts N")
        return create_testbed(s.outdir, s.facts, s.seed)
    return create_datasets(s.outdir, source=s.source, source_dir=s.source_dir, eval_fraction=s.eval_fraction,
                           seed=s.seed, forget_corpus=s.forget_corpus, max_retain=s.max_retain)
