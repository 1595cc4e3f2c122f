"""Presets (`unlearn --preset`): resolution, help, config.json, today's logs under `original`,
and every method's loss under every preset against an independent transcription of the
reference code (written here from the reference repositories, not calling ``losses.py``)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli import group
from conftest import UNLEARN_FORGET, UNLEARN_RETAIN, write_unlearn_data
from unlearn_lens.core.errors import UserError
from unlearn_lens.unlearning import presets
from unlearn_lens.unlearning.config import UnlearnConfig
from unlearn_lens.testing import make_tiny_model, save_tiny_model

GOLDEN = Path(__file__).parent / "data" / "unlearn_golden"
MINE = ("ga_simple", "ga", "grad_diff", "dpo", "npo", "simnpo", "rmu", "wt_dist", "wt_dist_reg")


def invoke(*args):
    return CliRunner().invoke(group, list(args), catch_exceptions=True)


# --- resolution ----------------------------------------------------------------------------

def test_every_method_has_original_and_mine_have_reference():
    from unlearn_lens.unlearning.config import METHODS

    assert set(presets.PRESETS) == set(METHODS)
    for method in METHODS:
        assert presets.PRESETS[method]["default"].values == {}  # default = this tool's defaults
    for method in MINE:
        assert presets.PRESETS[method]["original"].values == {}  # original = today's defaults
    for method in MINE:
        preset = presets.PRESETS[method]["reference"]
        assert preset.values and preset.source and "/" in preset.source  # a repository path is cited
        for key in preset.values:
            assert key in UnlearnConfig.__dataclass_fields__, key


def test_resolve_explicit_wins_and_unknown_preset_lists_valid():
    values = presets.resolve("rmu", "reference", {"alpha": 5.0})
    assert values["alpha"] == 5.0 and values["steering_coeff"] == 6.5 and values["lr"] == 5e-5
    assert values["depth_scaled"] == ["layer_id", "update_layers"]
    given_layer = presets.resolve("rmu", "reference", {"layer_id": 2})
    assert given_layer["depth_scaled"] == [] and "update_layers" not in given_layer  # derived from --layer-id
    assert "steps" not in presets.resolve("rmu", "reference", {"epochs": 2})  # --epochs replaces the preset's steps
    assert "epochs" not in presets.resolve("npo", "reference", {"steps": 3})
    assert presets.resolve("npo", "original", {"beta": 0.2}) == {"beta": 0.2, "depth_scaled": []}
    with pytest.raises(UserError, match="unknown --preset 'nope' for npo; choose one of default, original, reference"):
        presets.resolve("npo", "nope", {})


def test_scale_layers_by_depth():
    assert presets.scale_layers([5, 6, 7], 32) == [5, 6, 7]
    assert presets.scale_layers([5, 6, 7], 30) == [5, 6, 7]  # SmolLM2: round(6.56) = 7
    assert presets.scale_layers([5, 6, 7], 16) == [2, 3, 4]  # round half to even: 2.5 -> 2
    assert presets.scale_layers([7], 64) == [14]
    assert presets.scale_layers([5, 6, 7], 3) == [0, 1]  # clipped and de-duplicated
    cfg = UnlearnConfig(model="m", data="d", outdir="o", method="rmu", preset="reference")
    cfg.apply_preset(set())
    cfg.resolve_layers(16)
    assert (cfg.layer_id, cfg.target_layers, cfg.update_layers) == (4, [4], [2, 3, 4])
    assert cfg.extra["depth_scaled_from"] == {"layer_id": 7, "update_layers": [5, 6, 7]}


def test_help_states_default_and_lists_every_preset_with_source():
    for command in ("unlearn", "unlearn-all"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        first = " ".join(result.output.split("\n\n")[1].split())  # the docstring's first paragraph
        assert "default --preset default" in first
        text = " ".join(result.output.split())
        for method, named in presets.PRESETS.items():
            for name, preset in named.items():
                assert f"{method} {name}:" in text and " ".join(preset.source.split()) in text


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return str(save_tiny_model("gpt_neox", tmp_path_factory.mktemp("preset-neox")))


def test_unknown_preset_is_one_line_error(neox_dir, unlearn_data_dir, tmp_path):
    result = invoke("unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(tmp_path / "o"),
                    "--method", "rmu", "--preset", "nope", "--device", "cpu")
    assert result.exit_code == 2 and "choose one of default, original, reference" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


# --- runs ----------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("method", ["npo", "rmu", "wt_dist_reg"])
def test_preset_original_reproduces_todays_train_log(tmp_path, method):
    """The golden logs were recorded by tests/data/unlearn_golden/record.py on the base commit
    (405f6ab, before presets), same tiny model and data. On the recording machine the files are
    byte-identical. tolerance: ROUNDING (tests/float_path.py): the values after optimiser steps carry
    the recording machine's rounding, amplified by the steps; each may move by 10x what three one-ulp
    perturbations of the model's weights move it on this machine, and by at least 1e-5 relative,
    far below what a different hyper-parameter or loss changes."""
    from float_path import assert_tables_close, one_ulp_copy, read_table, spreads

    model = save_tiny_model("gpt_neox", tmp_path / "m")
    data = str(write_unlearn_data(tmp_path / "d"))

    def train_log(weights: Path, out: Path) -> list[list[str]]:
        args = ["unlearn", "--model", str(weights), "--data", data, "--outdir", str(out), "--method", method,
                "--steps", "3", "--batch-size", "2", "--max-length", "16", "--device", "cpu", "--no-progress",
                "--lr", "1e-3", "--eval-every", "1", "--preset", "original"]
        if method == "rmu":
            args += ["--layer-id", "1"]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        return read_table(out / "train_log.csv")

    out = tmp_path / method
    got = train_log(model, out)
    perturbed = [train_log(one_ulp_copy(model, tmp_path / f"m{seed}", seed), tmp_path / f"{method}{seed}")
                 for seed in range(3)]
    want = read_table(GOLDEN / f"{method}_train_log.csv")
    assert len(got) == len(want) == 4
    assert_tables_close(got, want, spreads(got, perturbed), method)
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["preset"] == "original" and config["config"]["extra"]["preset_values"] == {}


def test_config_json_records_preset_and_resolved_values(neox_dir, unlearn_data_dir, tmp_path):
    out = tmp_path / "rmu"
    result = invoke("unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(out),
                    "--method", "rmu", "--preset", "reference", "--steps", "1", "--batch-size", "2",
                    "--max-length", "12", "--device", "cpu", "--no-progress", "--alpha", "3")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    cfg = config["config"]
    assert cfg["preset"] == "reference" and cfg["extra"]["preset_values"]["alpha"] == 1200.0
    assert cfg["alpha"] == 3.0  # given explicitly: wins over the preset
    assert cfg["steps"] == 1 and cfg["steering_coeff"] == 6.5 and cfg["lr"] == 5e-5 and cfg["grad_clip"] == 0.0
    assert cfg["lr_scheduler"] == "constant" and cfg["update_roles"] == ["down"]
    assert (cfg["layer_id"], cfg["update_layers"]) == (1, [0, 1])  # 7 and 5..7 of 32, on 3 layers
    assert cfg["extra"]["depth_scaled_from"] == {"layer_id": 7, "update_layers": [5, 6, 7]}
    log = _rows(out / "train_log.csv")
    assert float(log[0]["lr"]) == 5e-5


def test_unlearn_all_applies_the_preset_per_method(neox_dir, unlearn_data_dir, tmp_path):
    result = invoke("unlearn-all", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(tmp_path),
                    "--methods", "simnpo,wt_dist_reg", "--preset", "reference", "--steps", "1", "--batch-size", "2",
                    "--max-length", "12", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    simnpo = json.loads((tmp_path / "simnpo" / "config.json").read_text())["config"]
    reg = json.loads((tmp_path / "wt_dist_reg" / "config.json").read_text())["config"]
    assert (simnpo["beta"], simnpo["forget_weight"], simnpo["epochs"]) == (4.5, 0.125, None)  # --steps given
    assert (reg["wt_reg_lambda"], reg["wt_reg_eps"], reg["beta"]) == (1.0, 1e-8, 0.1)


# --- losses against the reference code -----------------------------------------------------
#
# Each reference is transcribed unmodified; where the package departs from it, the transcription
# takes the departure as a keyword (default: the reference's choice) and the test asserts the
# size of the change on this batch (``DEVIATIONS``), then that the package equals the last link.

def _batch(tokenizer, texts, max_length=None):
    tokenizer.padding_side = "right"
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    enc = tokenizer(texts, padding=True, return_tensors="pt", **kwargs)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _labels(batch):
    """open-unlearning's labels for plain text (src/data/utils.py preprocess_pretraining_instance,
    the PretrainingDataset / CompletionDataset of its WMDP and MUSE runs: "never give loss on index
    0, when prefix is empty"), padded with -100 by DataCollatorForSupervisedDataset."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, 0] = -100
    return labels


def _hf_loss(model, batch, labels=None):
    """model(**inputs).loss as open-unlearning calls it: mean CE over the labelled shifted tokens."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=_labels(batch) if labels is None else labels).loss


def _compute_batch_nll(model, input_ids, attention_mask, labels):
    """open-unlearning src/trainer/utils.py compute_batch_nll: summed CE per sequence."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)


def _compute_dpo_loss(model, ref_model, win, lose, beta):
    """open-unlearning compute_dpo_loss (win None for NPO)."""
    win_log_ratio, lose_log_ratio = 0.0, 0.0
    if win is not None:
        win_loss = _compute_batch_nll(model, *win)
        with torch.no_grad():
            win_ref_loss = _compute_batch_nll(ref_model, *win)
        win_log_ratio = -(win_loss - win_ref_loss)
    lose_loss = _compute_batch_nll(model, *lose)
    with torch.no_grad():
        lose_ref_loss = _compute_batch_nll(ref_model, *lose)
    lose_log_ratio = -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def _chat_instance(question_ids, answer_ids, eos_id, append_eos=True):
    """src/data/utils.py preprocess_chat_instance without a chat template, on token ids: the prompt
    labelled -100, the answer labelled, EOS appended when the answer does not end with it."""
    chat_ids = question_ids + answer_ids
    if append_eos and chat_ids[-1] != eos_id:
        chat_ids = chat_ids + [eos_id]
    return chat_ids, [-100] * len(question_ids) + chat_ids[len(question_ids):]


def _collate(rows, pad_id):
    """DataCollatorForSupervisedDataset (right padding): ids padded with the pad id, labels with -100,
    attention_mask = ids != pad id."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, ids.ne(pad_id).long(), labels


def _idk_pairs(tokenizer, batch, seed, append_eos=True):
    """TOFU / open-unlearning's IdkDPO pairs (QAwithIdkDataset: the original answer = lose, an "I don't
    know" line = win, same question) on plain text. A plain text has no question: the first half of
    its tokens (at least one) stands in for it, the rest for the answer, and a space for the
    template's assistant tag before the refusal (the package's pairs, documented in `unlearn --help`);
    the refusal is drawn with a seeded generator where QAwithIdkDataset uses torch's global one.
    ``append_eos=False``: the package's choice (both continuations stop mid-text)."""
    lines = Path(__file__).parent.joinpath("data", "tofu_idontknow_head.txt").read_text().splitlines()
    generator = torch.Generator().manual_seed(seed)
    wins, loses = [], []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        question, answer = ids[:max(1, n // 2)], ids[max(1, n // 2):]
        idk = lines[int(torch.randint(0, len(lines), (1,), generator=generator).item())].strip()
        refusal = tokenizer(" " + idk, add_special_tokens=False)["input_ids"]
        wins.append(_chat_instance(question, refusal, tokenizer.eos_token_id, append_eos))
        loses.append(_chat_instance(question, answer, tokenizer.eos_token_id, append_eos))
    return _collate(wins, tokenizer.pad_token_id), _collate(loses, tokenizer.pad_token_id)


def _block_output(model, layer, batch):
    """WMDP rmu/utils.py forward_with_cache: the output of model.layers[layer] (a forward hook)."""
    blocks = model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers
    cache = []
    handle = blocks[layer].register_forward_hook(
        lambda module, inputs, output: cache.append(output[0] if isinstance(output, tuple) else output))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return cache[0]


def _masked_mse(hidden, target, mask):
    """The package's choice for RMU: the squared error averaged over real tokens only."""
    per_token = (hidden - target).pow(2).mean(-1)
    return (per_token * mask).sum() / mask.sum()


def _reference_loss(method, cfg, model, frozen, tokenizer, forget, retain, control=None, package=False):
    """The reference's loss; ``package=True`` switches the documented deviation (rmu: the MSE over
    real tokens instead of every position; dpo: no EOS after the continuations)."""
    gamma, alpha = cfg.forget_weight, 1.0  # open-unlearning gamma (forget) and alpha (retain NLL)
    if method == "ga_simple":  # GradAscent
        return -_hf_loss(model, forget)
    if method in ("ga", "grad_diff"):  # GradDiff
        return gamma * -_hf_loss(model, forget) + alpha * _hf_loss(model, retain)
    if method == "npo":
        lose = (forget["input_ids"], forget["attention_mask"], _labels(forget))
        return gamma * _compute_dpo_loss(model, frozen, None, lose, cfg.beta) + alpha * _hf_loss(model, retain)
    if method == "simnpo":
        labels = _labels(forget)
        loss_mask = labels != -100
        forget_loss = _compute_batch_nll(model, forget["input_ids"], forget["attention_mask"], labels)
        forget_loss = forget_loss / loss_mask.sum(-1) - 0.0  # delta 0
        forget_loss = -F.logsigmoid(cfg.beta * forget_loss).mean() * 2 / cfg.beta
        return gamma * forget_loss + alpha * _hf_loss(model, retain)
    if method == "dpo":
        win, lose = _idk_pairs(tokenizer, forget, cfg.seed, append_eos=not package)
        return gamma * _compute_dpo_loss(model, frozen, win, lose, cfg.beta) + alpha * _hf_loss(model, retain)
    if method == "rmu":  # WMDP rmu/unlearn.py: F.mse_loss over every position of the padded batch
        layer = cfg.layer_id
        mse = _masked_mse if package else (lambda h, t, mask: F.mse_loss(h, t.expand_as(h)))
        unlearn_loss = mse(_block_output(model, layer, forget), control, forget["attention_mask"])
        with torch.no_grad():
            frozen_retain = _block_output(frozen, layer, retain)
        retain_loss = mse(_block_output(model, layer, retain), frozen_retain, retain["attention_mask"]) * cfg.alpha
        return unlearn_loss + retain_loss
    if method == "wt_dist":  # retain fine-tuning (the noise is added before training)
        return _hf_loss(model, retain)
    if method == "wt_dist_reg":  # vision_unlearner.py weight_dist_reg + the retain CE
        flat = lambda params: torch.cat([p.reshape(-1) for p in params])  # noqa: E731
        param_diff = flat(frozen.parameters()).detach() - flat(model.parameters())
        weight_dist_loss = -torch.sqrt(torch.mean(torch.square(param_diff)) + cfg.wt_reg_eps)
        return _hf_loss(model, retain) + cfg.wt_reg_lambda * weight_dist_loss
    raise AssertionError(method)


#: the change of the one documented deviation, (package's choice) - (reference), on this batch
#: (tiny float64 Llama, the forget texts 0-2 and retain texts 1-3 right-padded); every other method
#: and preset equals its transcription. rmu: the reference averages the squared error over padded
#: positions too (the padded forget activations against the control vector count), the package over
#: real tokens; dpo: open-unlearning appends EOS to both answers (preprocess_chat_instance), the
#: package's plain-text continuations stop mid-text.
DEVIATIONS = {
    ("rmu", "original"): {"mean over real tokens": 0.00148356202},
    ("rmu", "reference"): {"mean over real tokens": 0.00233438636},
    ("dpo", "original"): {"no EOS after the continuations": -0.0296603879},
    ("dpo", "reference"): {"no EOS after the continuations": -0.0296603879},
}


@pytest.mark.parametrize("preset", ["original", "reference"])
@pytest.mark.parametrize("method", MINE)
def test_loss_against_the_unmodified_reference(method, preset):
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.unlearning import methods as M

    model, tokenizer = make_tiny_model("llama", seed=1)
    model = model.double()  # float64: the comparison measures the formulas, not float32 rounding
    frozen = copy.deepcopy(model).requires_grad_(False)
    cfg = UnlearnConfig(model="m", data="d", outdir="o", method=method, preset=preset, seed=5)
    cfg.apply_preset(set())
    adapter = ArchitectureAdapter(model)
    cfg.resolve_layers(adapter.num_layers)
    forget, retain = _batch(tokenizer, UNLEARN_FORGET[:3]), _batch(tokenizer, UNLEARN_RETAIN[1:4])
    assert not bool(forget["attention_mask"].all()) and not bool(retain["attention_mask"].all())  # padding
    ctx = M.MethodContext(cfg, model, adapter, total_steps=4, reference=M.Reference(frozen, ArchitectureAdapter(frozen)),
                          plain_model=model, hidden_size=model.config.hidden_size, early_stop=True, tokenizer=tokenizer)
    method_obj = M.build_method(ctx)  # before training: wt_dist_reg snapshots the pretrained weights here
    with torch.no_grad():  # the policy has moved away from the reference
        generator = torch.Generator().manual_seed(3)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    ours, _ = method_obj.loss(forget, retain, 0)
    control = None
    if method == "rmu":
        control = method_obj.targets[cfg.layer_id]  # random draw of the package; its norm is the coefficient
        assert float(control.norm()) == pytest.approx(cfg.steering_coeff, rel=1e-6) and float(control.min()) >= 0
    args = (method, cfg, model, frozen, tokenizer, forget, retain, control)
    theirs = _reference_loss(*args)
    assert ours.dtype == torch.float64
    deviation = DEVIATIONS.get((method, preset))
    if deviation is None:  # the package follows the reference here
        assert abs(float(ours) - float(theirs)) <= 1e-6, (float(ours), float(theirs))
        return
    (name, size), = deviation.items()
    switched = _reference_loss(*args, package=True)
    assert float(switched) - float(theirs) == pytest.approx(size, rel=1e-6, abs=1e-9), (name, float(switched) - float(theirs))
    assert abs(float(ours) - float(switched)) <= 1e-6, (float(ours), float(switched))


def test_dpo_pairs_split_half_and_refusals_are_seeded():
    from unlearn_lens.unlearning.dpo_pairs import REFUSALS, build_pairs, refusal_token_ids

    _, tokenizer = make_tiny_model("gpt_neox")
    forget = _batch(tokenizer, UNLEARN_FORGET[:4])
    refusals = refusal_token_ids(tokenizer)
    win, lose = build_pairs(forget["input_ids"], forget["attention_mask"], refusals, torch.Generator().manual_seed(0),
                            tokenizer.pad_token_id)
    again, _ = build_pairs(forget["input_ids"], forget["attention_mask"], refusals, torch.Generator().manual_seed(0),
                           tokenizer.pad_token_id)
    assert torch.equal(win["input_ids"], again["input_ids"])  # seeded
    for i in range(4):
        n = int(forget["attention_mask"][i].sum())
        p = max(1, n // 2)
        assert lose["labels_mask"][i].tolist() == [0] * p + [1] * (n - p) + [0] * (forget["input_ids"].shape[1] - n)
        m = int(win["attention_mask"][i].sum())
        assert torch.equal(win["input_ids"][i, :p], forget["input_ids"][i, :p])  # the same prompt
        refusal = tokenizer.decode(win["input_ids"][i, p:m]).strip()
        assert refusal in REFUSALS and win["labels_mask"][i, p:m].all() and not win["labels_mask"][i, :p].any()
    listed = Path(__file__).parent.joinpath("data", "tofu_idontknow_head.txt").read_text().splitlines()
    assert tuple(listed) == REFUSALS


def test_demo_passes_the_preset_instead_of_its_method_flags(tmp_path):
    from unlearn_lens.demo import demo_settings, demo_steps

    source = "wmdp-demo"  # the demo's settings below are the WMDP-style set's (the testbed's: tests/test_steps.py)
    settings = demo_settings(tmp_path, "rmu,npo", source, device="cpu", max_samples=5, max_length=64, batch_size=2,
                             force=False, skip=frozenset(), empirical_rank=False, workers=None, lipschitz_samples=1,
                             tuned_lens_steps=1, tuned_lens_tokens=1, relearn=False)

    rmu, npo = (step.settings for step in demo_steps(settings, 5, "reference", source)[2:])
    assert rmu.preset == "reference" and (rmu.lr, rmu.alpha) == (5e-5, 1200.0)  # the preset's, not the demo's
    assert rmu.steps == 5 and npo.steps == 5
    original = demo_steps(settings, None, "original", source)[2].settings
    assert original.preset == "default" and (original.lr, original.alpha, original.steps) == (1e-3, 100.0, 20)


def test_reference_warmup_is_one_epoch_of_the_forget_set(neox_dir, unlearn_data_dir, tmp_path):
    """open-unlearning's warmup_epochs=1: int(1.0 * n_forget // effective batch) warm-up steps."""
    out = tmp_path / "npo"
    result = invoke("unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(out),
                    "--method", "npo", "--preset", "reference", "--steps", "2", "--batch-size", "1",
                    "--grad-accum-steps", "1", "--max-length", "12", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())
    n_forget = record["resolved"]["n_forget_train"]
    assert record["resolved"]["warmup_steps"] == n_forget and record["config"]["warmup_epochs"] == 1.0
    assert record["config"]["weight_decay"] == 0.01 and record["config"]["lr_scheduler"] == "linear"
    log = _rows(out / "train_log.csv")
    assert float(log[0]["lr"]) == pytest.approx(1e-5 / n_forget) and float(log[1]["lr"]) == pytest.approx(2e-5 / n_forget)
