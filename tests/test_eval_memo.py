"""The evaluation memo (``OUT/.evaluations/``): reuse across models and steps, misses, force, damage.

Tiny random-init GPT-NeoX models: a base and two modified copies (a bias planted in block 1, as in
test_attack.py). ``unlearn_lens.evaluation.evaluate`` is wrapped to count how often a model is
really evaluated.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import write_unlearn_data
from test_attack import plant_bias

ATTACKS = ("quantize", "relearn-unrelated", "relearn-heldout")
OPTIONS = {"quant_settings": ("int4-g32",), "quant_bitsandbytes": False, "relearn_examples": 2, "relearn_steps": 2,
           "relearn_batch_size": 2, "relearn_lr": 1e-3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("memo")
    base = save_tiny_model("gpt_neox", root / "base")
    rng = np.random.default_rng(7)
    m1 = plant_bias(base, root / "m1", 4.0 * rng.normal(size=32).astype(np.float32))
    m2 = plant_bias(base, root / "m2", 4.0 * rng.normal(size=32).astype(np.float32))
    return {"root": root, "base": base, "m1": m1, "m2": m2, "data": write_unlearn_data(root / "data")}


@pytest.fixture
def calls(monkeypatch):
    """The number of real evaluations (``evaluation.evaluate`` calls) since the test began."""
    from unlearn_lens import evaluation

    count = {"n": 0}
    real = evaluation.evaluate

    def counted(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", counted)
    return count


def attack(models, model: str, out: Path, name: str, attacks=ATTACKS, **changes) -> tuple[Path, list[str]]:
    """Run `attack` on ``models[model]``; (its folder, the lines it echoed)."""
    from unlearn_lens.attacks.base import AttackSettings, attack_options
    from unlearn_lens.attacks.runner import run_attacks

    lines: list[str] = []
    settings = AttackSettings(base=str(models["base"]), model=str(models[model]), name=name,
                              data=str(models["data"]), outdir=str(out), attacks=attacks, max_length=32,
                              batch_size=4, options={k: v for k, v in OPTIONS.items() if k in attack_options(attacks)},
                              **changes)
    return run_attacks(settings, echo=lines.append), lines


def rows_without_seconds(folder: Path) -> list[dict]:
    with open(folder / "attacks.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_second_model_reuses_the_base_evaluations_and_writes_the_same_csv(models, calls, tmp_path):
    out = tmp_path / "out"
    attack(models, "m1", out, "m1")
    # reference (base, modified), quantize int4 x2, relearn-unrelated x2, relearn-heldout x2 (before and after)
    assert calls["n"] == 2 + 2 + 2 + 4
    calls["n"] = 0
    folder, lines = attack(models, "m2", out, "m2")
    # only the modified model's evaluations run: reference, quantize, relearn-unrelated, relearn-heldout x2
    assert calls["n"] == 1 + 1 + 1 + 2
    reused = [line for line in lines if "reusing the stored evaluation" in line]
    assert len(reused) == 5 and all(".evaluations" in line for line in reused)
    assert any("quantize int4-g32 (torchao): control" in line for line in reused)
    # ... and the results are those of a run without the memo (another output root)
    calls["n"] = 0
    alone, _ = attack(models, "m2", tmp_path / "alone", "m2")
    assert calls["n"] == 10
    assert rows_without_seconds(folder) == rows_without_seconds(alone)
    assert json.loads((folder / "reference.json").read_text())["metrics"] == \
        json.loads((alone / "reference.json").read_text())["metrics"]
    summary, summary_alone = (json.loads((f / "summary.json").read_text()) for f in (folder, alone))
    assert summary["best_recovery"] == summary_alone["best_recovery"]
    # relearn-heldout's reference (the unattacked models on the held-out half) takes its NLLs from the
    # attack's reference (the same texts) and scores only the questions: equal to a full evaluation
    import dataclasses

    from unlearn_lens.attacks.base import evaluation_record
    from unlearn_lens.attacks.relearning import heldout_split
    from unlearn_lens.relearn import evaluate_data, load_eval_data, load_for_eval

    data = load_eval_data(models["data"])
    held = dataclasses.replace(data, items=heldout_split(data.items, 0)[1])
    stored = json.loads((folder / "results" / "relearn-heldout.json").read_text())["results"][0]["reference"]
    for which in ("base", "m2"):
        model, tokenizer = load_for_eval(str(models[which]), None, "auto", "cpu", False)
        full = evaluate_data(model, tokenizer, held, 32, 4)
        expected = {k: None if isinstance(v, float) and v != v else v for k, v in evaluation_record(full).items()}
        assert stored["base" if which == "base" else "modified"] == expected  # per-item results too (NaN: null)


def test_misses_force_and_damage(models, calls, tmp_path):
    import shutil

    out = tmp_path / "out"
    model = shutil.copytree(models["m1"], tmp_path / "model")
    local = {**models, "local": model}
    attack(local, "local", out, "a", attacks=("quantize",))
    assert calls["n"] == 4  # reference x2, quantize x2
    calls["n"] = 0
    attack(local, "local", out, "b", attacks=("quantize",))
    assert calls["n"] == 0  # everything stored
    # the weights rewritten at the same path (same size): the modified model's evaluations miss
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    attack(local, "local", out, "c", attacks=("quantize",))
    assert calls["n"] == 2
    calls["n"] = 0
    attack(local, "local", out, "d", attacks=("quantize",), max_samples=2)  # other data: all miss
    assert calls["n"] == 4
    calls["n"] = 0
    attack(local, "local", out, "d", attacks=("quantize",), max_samples=2, force=True)  # force recomputes
    assert calls["n"] == 4
    # a damaged memo file is recomputed (and rewritten)
    memo = sorted((out / ".evaluations").glob("*.json"))
    # (reference, quantize) x (base, model) at first; the model's two again after the rewrite; all four of d
    assert len(memo) == 4 + 2 + 4
    for path in memo:
        path.write_text('{"key": ')
    calls["n"] = 0
    attack(local, "local", out, "e", attacks=("quantize",))
    assert calls["n"] == 4
    rewritten = [p for p in memo if p.read_text() != '{"key": ']
    assert len(rewritten) == 4 and all(json.loads(p.read_text())["result"]["n_questions"] == 4 for p in rewritten)


def test_relearn_and_attack_share_the_unattacked_evaluations(models, calls, tmp_path):
    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.relearn import RelearnSettings, run_relearn

    out = tmp_path / "out"
    settings = RelearnSettings(ModelRef(str(models["m1"])), ModelRef(str(models["base"])), str(models["data"]),
                               str(out), name="m1", compute=Compute("cpu", "auto", 4), steps=1, eval_every=1,
                               max_length=32, forget_subset=2, control=False, progress=False)
    folder = run_relearn(settings)
    assert calls["n"] == 3  # base, step 0, step 1
    summary = json.loads((folder / "summary.json").read_text())
    calls["n"] = 0
    attack_folder, lines = attack(models, "m1", out, "m1", attacks=("quantize",), device="auto")
    assert calls["n"] == 2  # the quantized models only: the reference comes from relearn's evaluations
    assert sum("reusing" in line for line in lines) == 2
    reference = json.loads((attack_folder / "reference.json").read_text())["metrics"]
    assert reference["base"]["forget_nll"] == summary["base_eval"]["forget_nll"]
    assert reference["modified"]["cloze_accuracy"] == summary["modified_eval"]["cloze_accuracy"]
    # relearn --overwrite recomputes both evaluations
    calls["n"] = 0
    import dataclasses

    run_relearn(dataclasses.replace(settings, overwrite=True))
    assert calls["n"] == 3


def test_key_covers_what_the_result_depends_on(tmp_path):
    from unlearn_lens.eval_memo import EvalMemo, eval_settings, memo_key

    model, data = {"spec": "m", "revision": None, "files": None}, {"forget": "f"}
    settings = eval_settings(max_length=32, batch_size=4, dtype="auto", device="cpu")
    assert settings == eval_settings(max_length=32, batch_size=4, dtype="float32", device="cpu")
    key = memo_key(model, None, data, settings)[0]
    others = [memo_key({**model, "revision": "v2"}, None, data, settings),
              memo_key(model, {"attack": "quantize", "setting": "int4"}, data, settings),
              memo_key(model, None, {"forget": "g"}, settings),
              memo_key(model, None, data, {**settings, "batch_size": 8}),
              memo_key(model, None, data, {**settings, "device": "cuda"})]
    assert len({key, *(k for k, _ in others)}) == 6
    memo, seen = EvalMemo(tmp_path), []
    first = memo.get("x", model, None, data, settings, lambda: {"a": float("nan"), "n": 3})
    again = EvalMemo(tmp_path, echo=seen.append).get("x", model, None, data, settings, lambda: 1 / 0)
    assert np.isnan(again[0]["a"]) and again[0]["n"] == 3 and again[1] == first[1] and len(seen) == 1
