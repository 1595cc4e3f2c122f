"""The planted-facts testbed: its data format, the held-out templates, the A1/A2/B split, `plant` on a tiny
model, retain-facts accuracy, relearn-heldout on A1 -> A2, and the report section.

Everything here is small and fast (a tiny random-init Llama, a testbed of 8 people); the known answers
on SmolLM2 are in tests/test_demo.py.
"""

from __future__ import annotations

import html
import json
import re

import pytest
from click.testing import CliRunner

from cli import group
from unlearn_lens import testbed as T
from unlearn_lens.core.errors import UserError
from unlearn_lens.data import read_manifest, read_mcq, read_retain_mcq, read_texts

FACTS = 8


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    result = CliRunner().invoke(group, ["datasets", "create", "--facts", str(FACTS), "--outdir", str(root / "data"),
                                        "--seed", "3"])
    assert result.exit_code == 0, result.output
    return root / "data"


def _entities(data):
    return {e.id: e for e in T.read_entities(data)}


def test_the_data_format_is_every_command_s(tiny_testbed):
    data = tiny_testbed
    entities = _entities(data)
    forget, retain = read_texts(data, "forget"), read_texts(data, "retain")
    questions, retain_questions = read_mcq(data), read_retain_mcq(data)
    per_entity = len(T.ATTRIBUTES[0].train)  # one text per training template, stating every fact
    groups = {g: [e for e in entities.values() if e.group == g] for g in T.GROUPS}
    assert [len(groups[g]) for g in T.GROUPS] == [2, 2, 4]  # A = 8 // 2 in halves, B the rest
    assert len(forget) == 4 * per_entity
    assert len(retain) == 4 * per_entity + T.GENERAL_PASSAGES
    general = (data / T.GENERAL_FILE).read_text().splitlines()  # plant's general text, never in retain.txt
    assert general and not set(general) & set(retain)
    assert len(questions) == len(retain_questions) == 4 * len(T.ATTRIBUTES)
    attributes = {a.name: a for a in T.ATTRIBUTES}
    for item in questions + retain_questions:  # 4 choices from the attribute's set, the answer the entity's value
        entity_id, attribute = item.id.split("-")
        entity, values = entities[entity_id], attributes[attribute].values
        assert entity.forget == (item in questions)
        assert len(set(item.choices)) == 4 and set(item.choices) <= set(values)
        assert item.choices[item.answer] == entity.attributes[attribute]
        assert item.question == attributes[attribute].heldout.format(name=entity.name)
    manifest = read_manifest(data)
    assert manifest["generator"] == {"name": T.GENERATOR, "version": T.GENERATOR_VERSION, "seed": 3, "facts": FACTS,
                                     "general_passages": T.GENERAL_PASSAGES}
    assert {g: manifest["split"][g] for g in T.GROUPS} == {g: [e.id for e in groups[g]] for g in T.GROUPS}
    assert manifest["counts"]["wmdp_eval"] == len(questions) and T.is_testbed(data)
    from unlearn_lens.data_files import files_hash, sha256

    assert manifest["files"] == {name: sha256(data / name) for name in manifest["files"]}
    assert manifest["hash"] == files_hash(manifest["files"])


def test_the_testbed_is_drawn_from_its_seed(tmp_path, tiny_testbed):
    again = T.create_testbed(tmp_path / "again", FACTS, seed=3)
    other = T.create_testbed(tmp_path / "other", FACTS, seed=4)
    assert again["hash"] == read_manifest(tiny_testbed)["hash"] != other["hash"]
    assert (tmp_path / "again" / "forget.txt").read_bytes() == (tiny_testbed / "forget.txt").read_bytes()


def test_held_out_templates_never_appear_in_training_text(tiny_testbed):
    data = tiny_testbed
    training = read_texts(data, "forget") + read_texts(data, "retain")
    corpus = "\n".join(training).lower()
    questions = read_mcq(data) + read_retain_mcq(data) + read_mcq(data, T.DEV_MCQ_FILE)
    assert len(questions) == 2 * FACTS * len(T.ATTRIBUTES)  # evaluation: A and B; dev: A and B
    for item in questions:
        assert item.question.lower() not in corpus
    for attribute in T.ATTRIBUTES:  # nor any question template, about anyone
        for template in (attribute.heldout, attribute.dev):
            pattern = re.escape(template.removesuffix("?")).replace(re.escape("{name}"), r"\S+ \S+")
            assert not re.search(pattern, corpus, re.IGNORECASE), template
        assert attribute.heldout != attribute.dev and attribute.heldout not in attribute.train


def test_a1_a2_and_b_are_disjoint_by_entity(tiny_testbed):
    data = tiny_testbed
    entities = list(_entities(data).values())
    names = {g: {e.name for e in entities if e.group == g} for g in T.GROUPS}
    assert not (names["A1"] & names["A2"]) and not ((names["A1"] | names["A2"]) & names["B"])
    for part in (0, -1):  # no first name or surname is shared: a person is never half in A, half in B
        names_part = [e.name.split()[part] for e in entities]
        assert len(set(names_part)) == len(names_part)
    for text in read_texts(data, "forget"):
        assert any(name in text for name in names["A1"] | names["A2"])
        assert not any(name.split()[-1] in text for name in names["B"])
    ids = {g: T.group_question_ids(entities, (g,)) for g in T.GROUPS}
    assert not (ids["A1"] & ids["A2"]) and {q.id for q in read_mcq(data)} == ids["A1"] | ids["A2"]
    assert {q.id for q in read_retain_mcq(data)} == ids["B"]


def test_bad_testbed_requests_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="at least 4"):
        T.create_testbed(tmp_path / "x", 3)
    result = CliRunner().invoke(group, ["datasets", "create", "--facts", "8", "--demo", "--outdir", str(tmp_path)])
    assert result.exit_code == 2 and "--facts writes the planted-facts testbed" in result.output


def test_evaluate_reports_retain_facts_accuracy(tiny_testbed):
    """evaluate() on a testbed adds the cloze accuracy on retain_mcq.jsonl, equal to cloze_correct on it."""
    from unlearn_lens.evaluation import cloze_correct, evaluate
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("llama")
    result = evaluate(model, tokenizer, tiny_testbed, max_length=32, batch_size=4)
    expected = cloze_correct(model, tokenizer, read_retain_mcq(tiny_testbed), batch_size=3)
    assert result["per_item"]["retain_cloze_accuracy"]["correct"] == expected
    assert result["retain_cloze_accuracy"] == sum(expected) / len(expected)
    assert result["n_retain_questions"] == len(expected) == FACTS // 2 * len(T.ATTRIBUTES)


def test_forget_value_nll_reads_the_values_alone_as_hf_loss_does(tiny_testbed):
    """evaluate() on a testbed: ``forget_value_nll`` per forget text equals HF's own loss with every label
    but the values' masked (-100), the values found by plant's answer rule (``encode_facts``); its mean is
    the token-weighted mean of those, and the whole-text forget NLL is unchanged beside it."""
    import torch

    from unlearn_lens.evaluation import evaluate, nll_per_text
    from unlearn_lens.plant import encode_facts
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("llama")
    result = evaluate(model, tokenizer, tiny_testbed, max_length=128, batch_size=3)  # no text is cut
    forget, spans = read_texts(tiny_testbed, "forget"), T.value_spans(tiny_testbed)
    assert set(forget) <= set(spans) and len(spans) == FACTS * len(T.ATTRIBUTES[0].train)
    record = result["per_item"]["forget_value_nll"]
    for i, (ids, read) in enumerate(encode_facts(tokenizer, [(t, spans[t]) for t in forget], "answer")):
        ids, read = ids[:-1], read[:-1]  # plant's EOS is no value
        labels = torch.tensor([[token if on else -100 for token, on in zip(ids, read)]])
        with torch.no_grad():
            loss = float(model(torch.tensor([ids]), labels=labels).loss)
        assert record["count"][i] == sum(read[1:]) >= len(T.ATTRIBUTES)  # a value is one token or more
        assert record["sum"][i] == pytest.approx(loss * sum(read[1:]), rel=1e-5)
    assert result["forget_value_nll"] == pytest.approx(sum(record["sum"]) / sum(record["count"]), rel=1e-6)
    whole, count, _, _ = nll_per_text(model, tokenizer, forget, max_length=128)
    assert result["forget_nll"] == pytest.approx(whole / count, rel=1e-6)  # batches of another size


def test_a_slow_tokenizer_leaves_the_values_nll_unmeasured_not_the_evaluation_failed(tiny_testbed, monkeypatch):
    """Without character offsets (a slow tokenizer) no value token can be found: ``forget_value_nll`` is NaN
    and every other metric is still read; asked for directly, the value mask says why in one line."""
    import math

    from unlearn_lens.evaluation import evaluate, value_mask
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("llama")
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    result = evaluate(model, tokenizer, tiny_testbed, max_length=128, batch_size=4)
    assert math.isnan(result["forget_value_nll"]) and "forget_value_nll" not in result["per_item"]
    assert math.isfinite(result["forget_nll"]) and result["n_questions"] > 0
    with pytest.raises(UserError, match="fast tokenizer"):
        value_mask(tokenizer, "Ana plays the harp.", [(14, 18)], 32)


# --- plant -----------------------------------------------------------------------------------------

PLANT_ARGS = ["--max-steps", "3", "--eval-every", "2", "--rows", "4", "--general-rows", "1", "--seq-len", "32",
              "--lr", "1e-3", "--dev-questions", "4", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def planted(tiny_testbed, tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("planted")
    model = save_tiny_model("llama", root / "tiny")
    out = root / "planting"
    result = CliRunner().invoke(group, ["plant", "--model", str(model), "--data", str(tiny_testbed), "--outdir",
                                        str(out), *PLANT_ARGS])
    assert result.exit_code == 0, result.output
    return {"model": model, "out": out, "output": result.output}


def test_plant_json_is_complete(planted, tiny_testbed):
    from analyses.uncertainty import Estimate
    from unlearn_lens.core.outputs import is_complete

    out = planted["out"]
    assert is_complete(out) and (out / "model" / "config.json").is_file() and (out / "train_log.csv").is_file()
    record = json.loads((out / "plant.json").read_text())
    assert record["steps"] == 3 and record["stopped"] in ("target", "budget")
    assert set(record["loss"]) == {"first", "last", "mean_last_10"} and record["tokens_trained"] > 0
    n = {"forget_facts_accuracy": FACTS // 2 * 3, "retain_facts_accuracy": FACTS // 2 * 3,
         "general_nll": record["counts"]["general_eval"]}
    for when in ("before", "after", "change"):
        for metric, count in n.items():
            estimate = Estimate(**record[when][metric])
            assert estimate.n == count and estimate.low <= estimate.value <= estimate.high, (when, metric)
    assert record["data_hash"] == read_manifest(tiny_testbed)["hash"]
    assert record["settings"]["max_steps"] == 3 and record["settings"]["seed"] == 0
    # the general passages measured are never trained on: the pool / measurement halves of retain.txt
    from unlearn_lens.plant import load_plant_data

    data = load_plant_data(tiny_testbed)
    assert data.general_eval and data.general_train and not set(data.general_eval) & set(data.general_train)
    assert "forget facts accuracy" in planted["output"] and "[" in planted["output"]


def test_planting_moves_the_model_and_is_seeded(planted, tiny_testbed, tmp_path):
    """The saved weights differ from the base; the same seed plants the same weights (a rerun elsewhere)."""
    from safetensors.numpy import load_file

    base = load_file(str(planted["model"] / "model.safetensors"))
    first = load_file(str(planted["out"] / "model" / "model.safetensors"))
    assert any((base[k] != first[k]).any() for k in base)
    result = CliRunner().invoke(group, ["plant", "--model", str(planted["model"]), "--data", str(tiny_testbed),
                                        "--outdir", str(tmp_path / "again"), *PLANT_ARGS])
    assert result.exit_code == 0, result.output
    again = load_file(str(tmp_path / "again" / "model" / "model.safetensors"))
    assert all((again[k] == first[k]).all() for k in first)


def test_a_finished_planting_is_kept_and_other_settings_refused(planted, tiny_testbed):
    out, args = planted["out"], ["plant", "--model", str(planted["model"]), "--data", str(tiny_testbed),
                                 "--outdir", str(planted["out"])]
    stamp = (out / "plant.json").stat().st_mtime_ns
    assert CliRunner().invoke(group, [*args, *PLANT_ARGS]).exit_code == 0
    assert (out / "plant.json").stat().st_mtime_ns == stamp  # the same settings: nothing redone
    result = CliRunner().invoke(group, [*args, *PLANT_ARGS[:-1], "--lr", "2e-3"])
    assert result.exit_code == 2 and "other settings; pass --overwrite" in result.output


def test_plant_refuses_data_that_is_not_a_testbed(tmp_path, unlearn_data_dir):
    result = CliRunner().invoke(group, ["plant", "--model", str(tmp_path / "m"), "--data", str(unlearn_data_dir),
                                        "--outdir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not a planted-facts testbed" in result.output


def test_packing_keeps_whole_texts():
    from unlearn_lens.plant import pack_rows

    texts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12, 13, 14, 15, 16, 17]]
    stream = iter([(ids, [i % 2 == 0 for i in ids]) for ids in texts])
    carry: list = []
    rows = pack_rows(stream, 2, 6, carry)
    assert [ids for ids, _ in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert [read for _, read in rows] == [[False, True, False, True, False], [True, False, True, False, True]]
    assert carry == [([11, 12, 13, 14, 15, 16], [False, True, False, True, False, True])]  # cut to seq_len


def test_the_answer_only_loss_reads_the_values():
    """--loss-on answer: the loss reads the tokens of each value (and the final EOS), nothing else."""
    from unlearn_lens.plant import encode_facts
    from unlearn_lens.testing import build_tokenizer

    tokenizer = build_tokenizer()
    entity = T.Entity("e0", "Maren Korwick", "A1", {"city": "Lisbon", "occupation": "baker", "instrument": "harp"})
    facts = entity.training_facts()
    assert len(facts) == len(T.ATTRIBUTES[0].train) and all(len(a.train) == len(facts) for a in T.ATTRIBUTES)
    for (ids, read), (text, spans) in zip(encode_facts(tokenizer, facts, "answer"), facts):
        assert [text[a:b] for a, b in spans] == ["Lisbon", "baker", "harp"]
        assert ids[-1] == tokenizer.eos_token_id and read[-1]
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        read_text = "".join(text[a:b] for (a, b), r in zip(offsets, read) if r)
        assert read_text.replace(" ", "") == "Lisbonbakerharp", (text, read_text)
    assert all(all(read) for _, read in encode_facts(tokenizer, facts, "text"))


# --- relearn-heldout on A1 -> A2, and the report ---------------------------------------------------

def test_relearn_heldout_trains_on_a1_and_evaluates_a2(planted, tiny_testbed, tmp_path):
    from analyses.report.testbed import heldout_estimates
    from unlearn_lens.attacks import relearning as R
    from unlearn_lens.attacks.base import AttackContext, AttackSettings

    settings = AttackSettings(base=str(planted["out"] / "model"), model=str(planted["model"]), name="edit",
                              data=str(tiny_testbed), outdir=str(tmp_path), attacks=("relearn-heldout",),
                              max_length=32, batch_size=4,
                              options={"relearn_steps": 2, "relearn_lr": 1e-3, "relearn_batch_size": 4})
    ctx = AttackContext(settings, echo=lambda message: None)
    results = R.run_heldout(ctx)
    entities = T.read_entities(tiny_testbed)
    split = json.loads((ctx.attack_dir / R.SPLIT_FILE).read_text())
    assert set(split["eval_ids"]) == T.group_question_ids(entities, ("A2",))
    assert set(split["train_ids"]) == T.group_question_ids(entities, ("A1",))
    assert results[0].extra["n_examples"] == len(T.group_texts(entities, ("A1",)))
    per_item = json.loads((ctx.attack_dir / R.PER_ITEM_FILE).read_text())
    assert per_item["ids"] == split["eval_ids"]
    for which, target in (("modified", 0), ("base", 1)):
        correct = per_item[which]["after"]["correct"]
        assert sum(correct) / len(correct) == results[target].metrics["cloze_accuracy"]
        assert sum(per_item[which]["before"]["correct"]) / len(correct) == \
            results[0].reference[which]["cloze_accuracy"]
    found = heldout_estimates(per_item)
    assert found["modified_after"].n == len(split["eval_ids"]) == FACTS // 4 * 3


def test_report_section_shows_accuracies_with_intervals(tmp_path):
    """The testbed section: every accuracy as 'value [low, high], n = N', computed from per-item results."""
    from analyses.io import atomic_write_json
    from analyses.report import ReportInputs, render_report
    from analyses.uncertainty import accuracy_estimate, change_estimate, recovery_estimate
    from unlearn_lens.core.outputs import mark_complete

    correct = {"planted": [1] * 9 + [0], "unlearned": [0, 0, 1, 0, 0, 0, 1, 0, 0, 0], "retrained": [1] * 8 + [0, 0]}
    (tmp_path / "planted__to__ga").mkdir()
    atomic_write_json(tmp_path / "planting" / "plant.json", {
        "steps": 40, "stopped": "target",
        **{when: {"forget_facts_accuracy": accuracy_estimate(c).record(),
                  "retain_facts_accuracy": accuracy_estimate(c).record(),
                  "general_nll": {"value": 3.0, "low": 2.9, "high": 3.1, "n": 5, "note": ""}}
           for when, c in (("before", [0, 1, 0, 0]), ("after", correct["planted"]))}})
    values = {"before": {"sum": [0.1, 0.2, 0.3], "count": [3, 3, 3]}, "after": {"sum": [3.0, 3.3, 2.7], "count": [3] * 3}}
    per_item = {"cloze_accuracy": {"correct": correct["unlearned"]},
                "retain_cloze_accuracy": {"correct": correct["planted"]}, "forget_value_nll": values["after"]}
    atomic_write_json(tmp_path / "unlearning" / "ga" / "eval.json", {
        "before": {"per_item": {"cloze_accuracy": {"correct": correct["planted"]},
                                "forget_value_nll": values["before"]}},
        "after": {"cloze_accuracy": 0.2, "per_item": per_item}})
    atomic_write_json(tmp_path / "ga" / "attacks" / "heldout_per_item.json", {
        "ids": list("abcdefghij"), "base": {"before": {"correct": correct["planted"]},
                                            "after": {"correct": correct["planted"]}},
        "modified": {"before": {"correct": correct["unlearned"]}, "after": {"correct": correct["retrained"]}}})
    mark_complete(tmp_path / "ga" / "attacks", "{}")  # the report reads only folders marked complete
    page = render_report(ReportInputs(tmp_path, "planted", ["ga"]))
    assert "Planted facts: what each model knows" in page
    assert accuracy_estimate(correct["planted"]).text() in page  # 0.90 [0.70, 1.00], n = 10
    assert accuracy_estimate(correct["unlearned"]).text() in page
    recovery = recovery_estimate({"correct": correct["retrained"]}, {"correct": correct["unlearned"]},
                                 {"correct": correct["planted"]})
    assert recovery.text() in page and re.search(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\], n = 10", recovery.text())
    # the values' NLL before -> after unlearning (0.6 / 9 -> 9 / 9 nats per token), paired over the 3 texts
    change = change_estimate(values["before"], values["after"])
    assert html.escape(f"ga: forget_value_nll: 0.067 -> 1.000, change +{change.text(3)}") in page
    assert change.n == 3 and change.low > 0
    # a study without testbed outputs has no such section
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "base__to__x").mkdir()
    assert "Planted facts" not in render_report(ReportInputs(tmp_path / "other", "base", ["x"]))


def test_printout_gives_each_attack_recovery_its_interval_and_n(tmp_path):
    """The demo's "Best recovery ... per attack" line reads each recovery's interval and n from the columns
    the attacks write to attacks.csv (it printed n = 0 for every attack but relearn-heldout)."""
    import csv

    from analyses.recovery import BASE_COLUMNS
    from analyses.report.testbed import testbed_lines
    from unlearn_lens.core.outputs import mark_complete

    folder = tmp_path / "ga" / "attacks"
    folder.mkdir(parents=True)
    rows = [{"attack": "quantize", "setting": "int4-g32", "target": "modified", "recovery_cloze_accuracy": "0.25",
             "recovery_cloze_accuracy_low": "0.05", "recovery_cloze_accuracy_high": "0.5", "n_cloze_accuracy": "30"},
            {"attack": "ablate", "setting": "layer=3", "target": "modified", "recovery_cloze_accuracy": "0.1"}]
    with open(folder / "attacks.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=BASE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    mark_complete(folder, "{}")
    (tmp_path / "planted__to__ga").mkdir()
    line = next(text for text in testbed_lines(tmp_path, "planted", ["ga"]) if text.startswith("Best recovery"))
    assert "quantize 0.25 [0.05, 0.50], n = 30" in line
    assert "ablate 0.10 (no interval in attacks.csv)" in line


def test_answer_nll_script_splits_each_text_nll_into_values_and_the_rest(tiny_testbed, tmp_path):
    """scripts/answer_nll.py: per text, the value tokens' NLL plus the others' equals HF's own loss on the
    text (its EOS left out), and the value tokens are those ``plant --loss-on answer`` reads."""
    import importlib.util
    from pathlib import Path

    import torch

    from unlearn_lens.loading import load_model
    from unlearn_lens.plant import encode_facts
    from unlearn_lens.testing import save_tiny_model

    spec = importlib.util.spec_from_file_location("answer_nll", Path(__file__).parents[1] / "scripts" / "answer_nll.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, tokenizer = load_model(str(save_tiny_model("llama", tmp_path / "m")), dtype="float32")
    facts = T.group_facts(T.read_entities(tiny_testbed), ("B",))
    records = script.split_records(model.eval(), tokenizer, facts)
    for i, (ids, answer) in enumerate(encode_facts(tokenizer, facts, "answer")):
        text = torch.tensor([ids[:-1]])
        with torch.no_grad():
            whole = float(model(text, labels=text).loss) * (len(ids) - 2)
        assert records["answer"]["sum"][i] + records["other"]["sum"][i] == pytest.approx(whole, rel=1e-5)
        assert records["answer"]["count"][i] == sum(answer[1:-1]) > 0
        assert records["answer"]["count"][i] + records["other"]["count"][i] == len(ids) - 2
