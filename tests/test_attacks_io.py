"""Quantization and relearning-control attacks on tiny models: a known answer for int8, the
evaluation-leak guard, the held-out split, and the rows the controls write."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import UNLEARN_MCQ, UNLEARN_RETAIN, write_unlearn_data
from unlearn_lens.attacks import quantization as Q
from unlearn_lens.attacks import relearning as R
from unlearn_lens.attacks.base import METRICS, AttackContext, AttackResult, AttackSettings, evaluation_record
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
        # bit-identical quantized models: equal to the last digit (forget_value_nll: NaN in both, no testbed)
        assert str(attacked) == str(control) and math.isnan(attacked["forget_value_nll"])
        differing = [m for m in METRICS if math.isfinite(reference["base"][m])
                     and reference["base"][m] != reference["modified"][m]]
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
    count = Q.quantize_torchao(model, "int4-g32")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert count == 21 and weight.block_size[-1] == 32  # one scale per 32 input weights
    assert type(model.lm_head.weight).__name__ == "Parameter"
    assert "lm_head" in Q.selected_linears(model, lm_head=True) and "lm_head" not in Q.selected_linears(model)
    # group 128 divides none of this model's widths (32, 96): nothing is quantized, as Int4WeightOnlyConfig skips
    model, _ = make_tiny_model("llama")
    assert Q.quantize_torchao(model, "int4") == 0
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ == "Parameter"
    model, _ = make_tiny_model("llama", hidden=128)
    assert Q.quantize_torchao(model, "int4") == 21 and model.model.layers[0].mlp.down_proj.weight.block_size[-1] == 128


def test_unknown_setting_is_a_one_line_error():
    from unlearn_lens.testing import make_tiny_model

    with pytest.raises(UserError, match="unknown setting"):
        Q.quantize_torchao(make_tiny_model("llama")[0], "int3")


@pytest.mark.parametrize("setting", ["int8", "int4-g32"])
def test_gpt2_conv1d_layers_are_quantized_as_the_prediction_says(setting):
    """GPT-2's Conv1D layers become the equivalent nn.Linear (the same function), then are quantized:
    the codes are the numpy transcription's of W^T, the (out, in) matrix ``params`` reads."""
    import torch

    from analyses.weights.quantization import quantize_codes
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("gpt2")
    stored = {name: module.weight.detach().numpy().T.copy() for name, module in model.named_modules()
              if type(module).__name__ == "Conv1D"}
    ids = torch.tensor([tokenizer("Viruses replicate inside host cells.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
        assert Q.conv1d_to_linear(model) == 12 and Q.conv1d_to_linear(model) == 0
        assert torch.allclose(model(ids).logits, before, atol=1e-5)  # the same function
    assert Q.quantize_torchao(model, setting) == 12
    modules = dict(model.named_modules())
    for name, w in stored.items():
        codes, scales, _ = quantize_codes(w, setting, "float32")
        np.testing.assert_array_equal(modules[name].weight.qdata.numpy(), codes)


def test_gpt2_pair_quantizes(tmp_path):
    """A GPT-2 pair through the attack: rows for both targets, every Conv1D quantized."""
    from unlearn_lens.testing import save_tiny_model

    base, modified = save_tiny_model("gpt2", tmp_path / "base"), save_tiny_model("gpt2", tmp_path / "modified", seed=1)
    data = write_unlearn_data(tmp_path / "data")
    ctx = _context(tmp_path, base, modified, data, quant_settings=("int8", "int4"), quant_bitsandbytes=False)
    rows = list(Q.run(ctx))
    assert [(r.setting, r.target) for r in rows] == [("int8", "modified"), ("int8", "control"), ("int4", "modified"),
                                                     ("int4", "control")]
    assert all(r.extra["quantized_layers"] == 12 for r in rows[:2])
    assert all(math.isfinite(v) == (m != "forget_value_nll") for r in rows[:2] for m, v in r.metrics.items())
    # group 128 divides only the MLP's output projections (input width 128): 3 layers
    assert all(r.extra["quantized_layers"] == 3 and r.extra["group_size"] == 128 for r in rows[2:])


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
        assert set(row.metrics) == set(METRICS)  # all measured, but the values' NLL (no testbed here)
        assert all(math.isfinite(v) == (m != "forget_value_nll") for m, v in row.metrics.items())
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
        stored, fresh = (json.dumps(r, sort_keys=True) for r in (results[0].reference[which],
                                                                  evaluation_record(expected)))
        assert stored == fresh  # per-item results too (as JSON text: the values' NLL, NaN here, equals NaN)
    assert results[0].reference is results[1].reference


def test_options_given_as_command_line_strings(tmp_path):
    data = write_unlearn_data(tmp_path / "data")
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, quant_settings="int8, int4",
                   quant_bitsandbytes="false")
    assert Q._settings(ctx) == [("torchao", "int8"), ("torchao", "int4")]
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, quant_settings="int8", quant_bitsandbytes="maybe")
    with pytest.raises(UserError, match="quant_bitsandbytes: unknown maybe"):
        Q._settings(ctx)
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, quant_settings="int4", quant_bitsandbytes="bnb-nf4")
    assert Q._settings(ctx) == [("torchao", "int4"), ("bitsandbytes", "bnb-nf4")]
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data)  # the defaults: every setting
    assert Q._settings(ctx) == [("torchao", s) for s in ("int8", "int4", "int4-g32")] + \
        [("bitsandbytes", s) for s in ("bnb-fp4", "bnb-nf4", "bnb-int8")]
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, relearn_steps="3", relearn_lr="1e-4")
    assert R._check_options(ctx) == (10, 3, 1e-4, 4)
    with pytest.raises(UserError, match="relearn_steps must be at least 1"):
        R._check_options(_context(tmp_path, tmp_path / "b", tmp_path / "m", data, relearn_steps="0"))


# --- relearning: presets and a known answer --------------------------------------------------------

def test_reference_preset_resolves_lucki_et_al_settings(tmp_path):
    data = write_unlearn_data(tmp_path / "data")
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, relearn_preset="reference")
    assert R._check_options(ctx) == (10, 20, 2e-4, 1)  # 10 examples, lr 2e-4, batch 1
    steps, training = R._training(ctx, 10, 20, 1)
    assert steps == 30 and training == {"lora": True, "lora_r": 128, "lora_alpha": 16.0, "lora_dropout": 0.0,
                                        "weight_decay": 0.01, "schedule": "linear", "warmup_steps": 2}
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data, relearn_preset="reference", relearn_steps=7,
                   relearn_lr="1e-3")
    assert R._check_options(ctx)[1:3] == (7, 1e-3) and R._training(ctx, 10, 7, 1)[0] == 7  # explicit options win
    ctx = _context(tmp_path, tmp_path / "b", tmp_path / "m", data)
    assert R._training(ctx, 10, 20, 4) == (20, {"lora": False, "weight_decay": 0.0, "schedule": "constant",
                                                "warmup_steps": 0})
    with pytest.raises(UserError, match="relearn_preset must be one of"):
        R._check_options(_context(tmp_path, tmp_path / "b", tmp_path / "m", data, relearn_preset="lucki"))


@pytest.fixture(scope="module")
def planted_shift(tmp_path_factory):
    """A tiny GPT-NeoX trained briefly on the test texts (so that it sits near a minimum of their
    NLL), and its copy with a vector added to block 1's output: an "unlearning" that is a shift."""
    import numpy as np
    import torch

    from conftest import UNLEARN_FORGET
    from test_attack import plant_bias
    from unlearn_lens.relearn import nll_loss
    from unlearn_lens.testing import make_tiny_model

    root = tmp_path_factory.mktemp("planted-shift")
    model, tokenizer = make_tiny_model("gpt_neox")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        nll_loss(model, tokenizer, UNLEARN_FORGET + UNLEARN_RETAIN, 64).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    v = np.random.default_rng(4).normal(size=32).astype(np.float32)
    modified = plant_bias(root / "base", root / "modified", 5 * v / np.linalg.norm(v))
    return root / "base", modified, write_unlearn_data(root / "data")


@pytest.mark.slow
@pytest.mark.parametrize("preset, options, least", [
    ("original", {"relearn_steps": 20, "relearn_lr": 1e-3}, 0.5),
    ("reference", {}, 0.02),  # LoRA at lr 2e-4 for 3 epochs of 8 texts: a small but real move
])
def test_relearning_on_unrelated_text_undoes_a_planted_shift(tmp_path, planted_shift, preset, options, least):
    """Known answer: the shift hurts every text, so fine-tuning on unrelated (retain-pool) text moves
    the shifted model's forget NLL back towards the base's, while the base itself barely moves."""
    base, modified, data = planted_shift
    ctx = _context(tmp_path, base, modified, data, relearn_preset=preset, **options)
    reference = {which: ctx.evaluate(*ctx.load(which)) for which in ("base", "modified")}
    gap = reference["modified"]["forget_nll"] - reference["base"]["forget_nll"]
    assert gap > 0.5  # the planted shift is a visible "unlearning"
    attacked, control = R.run_unrelated(ctx)
    assert attacked.extra["preset"] == preset and (preset == "original") == ("preset=" not in attacked.setting)
    recovery = (reference["modified"]["forget_nll"] - attacked.metrics["forget_nll"]) / gap
    moved_base = abs(control.metrics["forget_nll"] - reference["base"]["forget_nll"]) / gap
    assert recovery > least and moved_base < recovery / 2, (recovery, moved_base)
