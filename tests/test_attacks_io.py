"""Quantization and relearning-control attacks on tiny models: a known answer for int8, the
evaluation-leak guard, the held-out split, and the rows the controls write."""

from __future__ import annotations

import json
import math

import pytest

from conftest import UNLEARN_MCQ, UNLEARN_RETAIN, write_unlearn_data
from unlearn_lens.attacks import quantization as Q
from unlearn_lens.attacks import relearning as R
from unlearn_lens.attacks.base import METRICS, AttackContext, AttackResult, AttackSettings
from unlearn_lens.data import MCQItem, read_mcq
from unlearn_lens.core.errors import UserError

pytest.importorskip("torchao")


def _context(tmp_path, base, model, data, **options) -> AttackContext:
    settings = AttackSettings(base=str(base), model=str(model), name="m", data=str(data), outdir=str(tmp_path / "out"),
                              device="cpu", dtype="float32", batch_size=4, max_length=32, options=options)
    return AttackContext(settings)


# --- quantization: a known answer ------------------------------------------------------------------

def _grid_models(root, dw_in_steps: float):
    """A tiny Llama whose quantized weights sit on the int8 grid, and a copy moved by |dW| < dw_in_steps steps.

    Every quantized row is q * s (integers |q| <= 100) except one entry, 127.5 * s, which is the
    row's absmax, so torchao's int8 scale is s; dW is zero at that entry and below ``dw_in_steps * s``.
    """
    import torch

    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("llama", seed=1)
    generator = torch.Generator().manual_seed(0)
    names = set(Q.selected_linears(model))
    deltas = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name not in names:
                continue
            rows, cols = module.weight.shape
            step = 0.01 + 0.02 * torch.rand(rows, 1, generator=generator)
            q = torch.randint(-100, 101, (rows, cols), generator=generator).float()
            peak = torch.arange(rows) % cols
            q[torch.arange(rows), peak] = 127.5
            module.weight.copy_(q * step)
            delta = (2 * torch.rand(rows, cols, generator=generator) - 1) * dw_in_steps * step
            delta[torch.arange(rows), peak] = 0.0
            deltas[name] = delta
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in deltas:
                module.weight.add_(deltas[name])
    model.save_pretrained(root / "modified")
    tokenizer.save_pretrained(root / "modified")
    return root / "base", root / "modified"


def _int8_weights(ctx, which):
    model, _ = ctx.load(which)
    Q.quantize_torchao(model, "int8")
    modules = dict(model.named_modules())
    return {name: (modules[name].weight.qdata.clone(), modules[name].weight.scale.clone())
            for name in Q.selected_linears(model)}


@pytest.mark.parametrize("dw_in_steps, identical", [(0.24, True), (3.0, False)])
def test_int8_erases_an_update_below_a_quarter_step(tmp_path, dw_in_steps, identical):
    import torch

    base, modified = _grid_models(tmp_path, dw_in_steps)
    data = write_unlearn_data(tmp_path / "data")
    ctx = _context(tmp_path, base, modified, data, quant_settings=("int8",), quant_bitsandbytes=False)
    reference = {which: ctx.evaluate(*ctx.load(which)) for which in ("base", "modified")}
    assert reference["base"]["forget_nll"] != reference["modified"]["forget_nll"]  # the update is visible

    weights = {which: _int8_weights(ctx, which) for which in ("base", "modified")}
    assert weights["base"].keys() == weights["modified"].keys() and len(weights["base"]) == 3 * 7
    same = [torch.equal(weights["base"][n][0], weights["modified"][n][0]) and
            torch.equal(weights["base"][n][1], weights["modified"][n][1]) for n in weights["base"]]
    assert all(same) if identical else not any(same)

    rows = {r.target: r for r in Q.run(ctx)}
    assert set(rows) == {"modified", "control"}
    for row in rows.values():
        assert row.attack == "quantize" and row.setting == "int8" and set(row.metrics) == set(METRICS)
        assert row.extra["backend"] == "torchao" and row.extra["quantized_layers"] == 21
    attacked, control = rows["modified"].metrics, rows["control"].metrics
    if identical:
        assert attacked == control  # bit-identical quantized models: equal to the last digit
        differing = [m for m in METRICS if reference["base"][m] != reference["modified"][m]]
        assert "forget_nll" in differing
        for metric in differing:  # recovery against the control row is exactly 1
            unattacked = reference["modified"][metric]
            recovery = (attacked[metric] - unattacked) / (control[metric] - unattacked)
            assert recovery == 1.0, metric
    else:
        assert attacked["forget_nll"] != control["forget_nll"]


def test_int4_quantizes_with_groups_and_the_head_is_left_alone(tmp_path):
    from unlearn_lens.testing import make_tiny_model

    model, _ = make_tiny_model("llama")
    count = Q.quantize_torchao(model, "int4")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert count == 21 and weight.block_size[-1] == Q.INT4_GROUP_SIZE  # one scale per 32 input weights
    assert type(model.lm_head.weight).__name__ == "Parameter"
    assert "lm_head" in Q.selected_linears(model, lm_head=True) and "lm_head" not in Q.selected_linears(model)


def test_unknown_setting_and_conv1d_models_are_one_line_errors(tmp_path):
    from unlearn_lens.testing import make_tiny_model

    with pytest.raises(UserError, match="unknown setting"):
        Q.quantize_torchao(make_tiny_model("llama")[0], "int3")
    with pytest.raises(UserError, match="no torch.nn.Linear"):
        Q.quantize_torchao(make_tiny_model("gpt2")[0], "int8")


def test_missing_torchao_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    with pytest.raises(UserError, match=r"pip install torchao"):
        Q._torchao()


# --- the evaluation-leak guard and the held-out split ------------------------------------------

ITEMS = [MCQItem(f"q{i}", q, tuple(c), a) for i, (q, c, a) in enumerate(UNLEARN_MCQ)]


def test_leak_guard_by_id_and_by_normalised_text():
    clean = ["The river flows through the valley.", "Paris is the capital of France."]
    R.check_no_leak(clean, ITEMS)  # nothing to refuse
    with pytest.raises(UserError, match=r"by id: q1"):
        R.check_no_leak(clean, ITEMS, train_ids=["q1", "q9"])
    shouted = clean + ["  HOW do   bacteria\tDIVIDE?  Binary fission."]  # case and whitespace differ
    assert R.leaked_questions(shouted, ITEMS) == {"by_id": [], "by_text": ["q1"]}
    with pytest.raises(UserError, match=r"evaluation-leak guard.*by text: q1"):
        R.check_no_leak(shouted, ITEMS)


def test_heldout_split_is_deterministic_disjoint_and_by_id():
    items = [MCQItem(f"id{i}", f"Question number {i} about cells?", ("a", "b", "c", "d"), 0) for i in range(20)]
    train, held = R.heldout_split(items, seed=0)
    assert len(train) == 10 and len(held) == 10
    assert not {i.id for i in train} & {i.id for i in held} and {i.id for i in train + held} == {i.id for i in items}
    again = R.heldout_split(list(reversed(items)), seed=0)  # order does not matter
    assert sorted(i.id for i in again[0]) == sorted(i.id for i in train)
    assert {i.id for i in R.heldout_split(items, seed=1)[0]} != {i.id for i in train}
    twins = items + [MCQItem("id3", "Another question sharing id3?", ("a", "b", "c", "d"), 1)]
    split = R.heldout_split(twins, seed=0)
    assert sum(i.id == "id3" for i in split[0]) in (0, 2)  # an id never straddles the halves
    with pytest.raises(UserError, match="at least 2"):
        R.heldout_split(items[:1], seed=0)


def test_crafted_data_sets_are_refused_before_a_model_loads(tmp_path):
    question = UNLEARN_MCQ[0][0]
    leaky_retain = [f"{text} {question.upper()}" for text in UNLEARN_RETAIN]
    data = write_unlearn_data(tmp_path / "retain-leak", retain=leaky_retain)
    ctx = _context(tmp_path, tmp_path / "no-base", tmp_path / "no-model", data)
    with pytest.raises(UserError, match="evaluation-leak guard: the relearn-unrelated.*by text: q0"):
        R.run_unrelated(ctx)

    # the same question twice under two ids: one copy trains, the other is evaluated
    data = write_unlearn_data(tmp_path / "twins")
    records = [{"id": f"{prefix}{i}", "question": q, "choices": c, "answer": a}
               for prefix in ("q", "dup") for i, (q, c, a) in enumerate(UNLEARN_MCQ)]
    (data / "wmdp_mcq.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ctx = _context(tmp_path, tmp_path / "no-base", tmp_path / "no-model", data)
    train, held = R.heldout_split(read_mcq(data), 0)
    assert {i.question for i in train} & {i.question for i in held}  # the crafted set does straddle
    with pytest.raises(UserError, match="evaluation-leak guard: the relearn-heldout.*by text"):
        R.run_heldout(ctx)
    assert not (ctx.attack_dir / R.SPLIT_FILE).exists()


# --- the relearning controls write rows ------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("controls")
    data = write_unlearn_data(root / "data")
    return save_tiny_model("gpt_neox", root / "base"), save_tiny_model("gpt_neox", root / "modified", seed=1), data


def _check_rows(results, attack):
    assert [r.target for r in results] == ["modified", "control"]
    for row in results:
        assert isinstance(row, AttackResult) and row.attack == attack and row.setting.startswith("n=")
        assert set(row.metrics) == set(METRICS) and all(math.isfinite(v) for v in row.metrics.values())
        assert row.seconds > 0 and row.extra["steps"] == 2


def test_relearn_unrelated_rows(tmp_path, pair):
    base, modified, data = pair
    ctx = _context(tmp_path, base, modified, data, relearn_examples=3, relearn_steps=2, relearn_lr=1e-2)
    results = R.run_unrelated(ctx)
    _check_rows(results, "relearn-unrelated")
    assert results[0].reference is None and results[0].extra["n_examples"] == 3
    untouched = ctx.evaluate(*ctx.load("modified"))
    assert results[0].metrics["forget_nll"] != untouched["forget_nll"]  # the fine-tuning did move the model


def test_relearn_heldout_rows_split_and_reference(tmp_path, pair):
    base, modified, data = pair
    ctx = _context(tmp_path, base, modified, data, relearn_steps=2, relearn_lr=1e-2)
    results = R.run_heldout(ctx)
    _check_rows(results, "relearn-heldout")
    split = json.loads((ctx.attack_dir / R.SPLIT_FILE).read_text())
    assert len(split["train_ids"]) == 2 and len(split["eval_ids"]) == 2
    assert set(split["train_ids"]) | set(split["eval_ids"]) == {f"q{i}" for i in range(4)}
    # the reference is each unattacked model on the evaluated half, computed independently here
    import dataclasses

    half = dataclasses.replace(ctx.data, items=[i for i in ctx.data.items if i.id in split["eval_ids"]])
    for which in ("base", "modified"):
        expected = ctx.evaluate(*ctx.load(which), half)
        assert results[0].reference[which] == {m: expected[m] for m in METRICS}
    assert results[0].reference is results[1].reference


def test_options_given_as_command_line_strings(tmp_path):
    data = write_unlearn_data(tmp_path / "data")
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, quant_settings="int8, int4",
                   quant_bitsandbytes="false")
    assert Q._settings(ctx) == [("torchao", "int8"), ("torchao", "int4")]
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, quant_settings="int8", quant_bitsandbytes="maybe")
    with pytest.raises(UserError, match="quant_bitsandbytes must be true or false"):
        Q._settings(ctx)
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, relearn_steps="3", relearn_lr="1e-4")
    assert R._check_options(ctx) == (10, 3, 1e-4, 4)
    with pytest.raises(UserError, match="relearn_steps must be at least 1"):
        R._check_options(_context(tmp_path, tmp_path / "b", tmp_path / "m", data, relearn_steps="0"))
