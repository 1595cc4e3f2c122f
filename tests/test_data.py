"""Data sets: demo and local builds, the held-out split, the manifest, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unlearn_lens.data import (MCQItem, create_datasets, is_wikitext_body, read_manifest, read_mcq,
                               read_texts, split_heldout, warn_if_contaminated)
from unlearn_lens.core.errors import UserError

QUESTIONS = [
    {"question": f"Which structure number {i} stores the genetic material of a eukaryotic cell?",
     "choices": ["Nucleus", "Ribosome", "Vacuole", "Cell wall"], "answer": i % 4}
    for i in range(40)
]


@pytest.fixture()
def source_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "wmdp_bio.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (src / "wikitext.txt").write_text(" = Heading = \n\nThe river flows north .\n = = Sub = = \nParis is a city .\n")
    return src


def test_local_build_splits_questions_without_overlap(tmp_path, source_dir):
    manifest = create_datasets(tmp_path / "data", source="local", source_dir=source_dir, eval_fraction=0.5)
    data = tmp_path / "data"
    held_out = read_mcq(data)
    forget = read_texts(data, "forget")
    assert read_texts(data, "retain") == ["The river flows north .", "Paris is a city ."]
    assert len(held_out) + len(forget) == len(QUESTIONS)
    assert 8 <= len(held_out) <= 32
    assert not warn_if_contaminated(forget, held_out)
    assert set(manifest["heldout_split"]["eval_ids"]) == {item.id for item in held_out}
    assert manifest["counts"] == {"forget": len(forget), "retain": 2, "wmdp_eval": len(held_out),
                                  "wmdp_train": len(forget)}
    assert read_manifest(data)["hash"] == manifest["hash"]
    # forget texts carry the training questions with their correct answer
    train = {q["question"]: q for q in QUESTIONS} 
    for text in forget:
        question = text.rsplit("?", 1)[0] + "?"
        assert text.endswith(train[question]["choices"][train[question]["answer"]])


def test_build_is_deterministic_and_hash_tracks_content(tmp_path, source_dir):
    a = create_datasets(tmp_path / "a", source="local", source_dir=source_dir, seed=3)
    b = create_datasets(tmp_path / "b", source="local", source_dir=source_dir, seed=3)
    c = create_datasets(tmp_path / "c", source="local", source_dir=source_dir, seed=4)
    assert a["hash"] == b["hash"] and a["hash"] != c["hash"]


def test_split_is_stable_under_reordering():
    items = [MCQItem(str(i), q["question"], tuple(q["choices"]), q["answer"]) for i, q in enumerate(QUESTIONS)]
    evaluation, _ = split_heldout(items, 0.5, seed=0)
    evaluation_reversed, _ = split_heldout(items[::-1], 0.5, seed=0)
    assert {i.id for i in evaluation} == {i.id for i in evaluation_reversed}
    with pytest.raises(UserError):
        split_heldout(items, 0.0, seed=0)


def test_contamination_warns_loudly(capsys):
    item = MCQItem("x", "Which organelle carries out aerobic respiration in cells?", ("a", "b", "c", "d"), 0)
    assert warn_if_contaminated(["Intro. Which organelle carries out aerobic respiration in cells? a"], [item])
    assert "WARNING" in capsys.readouterr().err


def test_demo_set_is_offline_and_consistent(tmp_path):
    manifest = create_datasets(tmp_path, source="demo")
    items = read_mcq(tmp_path)
    forget, retain = read_texts(tmp_path, "forget"), read_texts(tmp_path, "retain")
    assert len(items) >= 40 and len(forget) >= 100 and len(retain) >= 100
    assert manifest["counts"]["wmdp_train"] == 0  # every demo question is held out
    assert not warn_if_contaminated(forget, items)
    assert {item.answer for item in items} == {0, 1, 2, 3}


def test_wikitext_filter():
    assert not is_wikitext_body(" = Valkyria Chronicles = ")
    assert not is_wikitext_body("   ")
    assert is_wikitext_body(" The game began development in 2010 .")


def test_bad_files(tmp_path):
    (tmp_path / "forget.txt").write_bytes(b"\xff\xfe bad bytes\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_texts(tmp_path, "forget")
    (tmp_path / "retain.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="empty"):
        read_texts(tmp_path, "retain")
    with pytest.raises(UserError, match="no such file"):
        read_mcq(tmp_path)
    (tmp_path / "wmdp_mcq.jsonl").write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(UserError, match="4 choices"):
        read_mcq(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_create_demo_and_errors(tmp_path):
    ok = _cli("datasets", "create", "--demo", "--outdir", str(tmp_path / "demo"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "demo" / "manifest.json").is_file()
    missing = _cli("datasets", "create", "--source-dir", str(tmp_path / "nope"), "--outdir", str(tmp_path / "x"))
    assert missing.returncode == 2 and "no such source directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    offline = _cli("datasets", "create", "--outdir", str(tmp_path / "hub"))
    assert offline.returncode == 2 and "could not load data set 'cais/wmdp'" in offline.stderr
    assert not (tmp_path / "hub" / "manifest.json").exists()
