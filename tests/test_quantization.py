"""Quantization-flip prediction: the numpy quantizer equals torchao's, and planted known answers."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from analyses.weights import quantization
from analyses.weights.params import run_params
from analyses.weights.quantization import FLIP_COLUMNS, INT4_GROUP_SIZE, QUANT_SETTINGS, flip_stats, quantize_codes


def _weights(rng, rows: int = 40, cols: int = 256) -> np.ndarray:
    """Gaussian weights with the edge cases: a zero row, a zero group, an outlier, exact ties at .5 steps."""
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[3] = 0.0
    w[5, :INT4_GROUP_SIZE] = 0.0
    w[7, 10] = 2.0
    w[9] = np.arange(cols, dtype=np.float32) - cols / 2  # steps of exactly 1: many .5 ties after scaling
    return w


def _torchao_config(setting: str):
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    spec = QUANT_SETTINGS[setting]
    if setting == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, spec.weight_dtype), granularity=PerGroup(spec.group_size))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("setting", list(QUANT_SETTINGS))
def test_codes_equal_torchao(setting, dtype):
    """The numpy codes and scales are torchao's quantized integer data and scales, bit for bit: int8,
    int4 at group 128 (the default) and at group 32, each built as its ``torchao_config`` names."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    rng = np.random.default_rng(0)
    for trial in range(3):
        w = _weights(rng) * (10.0 ** (trial - 1))
        weight = torch.from_numpy(w).to(getattr(torch, dtype))
        model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False)).to(weight.dtype)
        model[0].weight.data = weight.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, _torchao_config(setting))
        quantized = model[0].weight
        codes, scales, zero_points = quantize_codes(weight.float().numpy(), setting, dtype)
        np.testing.assert_array_equal(codes, quantized.qdata.numpy())
        np.testing.assert_array_equal(scales, quantized.scale.float().numpy().reshape(scales.shape))
        np.testing.assert_array_equal(zero_points, 0)
        assert codes.min() >= QUANT_SETTINGS[setting].qmin and codes.max() <= QUANT_SETTINGS[setting].qmax


def _bucket_centred(rng, rows: int, cols: int, step: float) -> np.ndarray:
    """Weights at int8 bucket centres (codes x step), each row's absmax entry 127.5 step: scale = step exactly."""
    w = (rng.integers(-120, 121, size=(rows, cols)) * step).astype(np.float32)
    w[:, 0] = 127.5 * step
    return w


def test_small_update_flips_nothing_large_update_flips():
    rng = np.random.default_rng(1)
    step = 2.0 ** -10
    w_a = _bucket_centred(rng, 16, 64, step)
    small = w_a + (rng.uniform(-0.24, 0.24, size=w_a.shape) * step).astype(np.float32)
    small[:, 0] = w_a[:, 0]  # the absmax entry stays: the scale does not move
    got = flip_stats(w_a, small, "int8")
    assert got["n_changed"] > 0.9 * w_a.size - 16
    assert got["n_flipped"] == 0 and got["n_dequant_changed"] == 0 and got["n_scale_changed"] == 0
    assert got["flip_share"] == 0.0 and got["dW_over_step_max"] < 0.25
    assert got["step_min"] == got["step_max"] == step

    large = w_a.copy()
    large[2:5, 3:9] += 3 * step  # 18 entries move by 3 buckets
    got = flip_stats(w_a, large, "int8")
    assert got["n_changed"] == got["n_flipped"] == got["n_flipped_changed"] == 18
    assert got["flip_share"] == pytest.approx(18 / w_a.size) and got["flip_share_of_changed"] == 1.0
    assert got["dW_over_step_max"] == pytest.approx(3.0)


def test_row_chunks_give_the_same_counts(monkeypatch):
    rng = np.random.default_rng(2)
    w_a = _weights(rng, rows=50, cols=128)
    w_b = w_a + (rng.standard_normal(w_a.shape) * 0.01).astype(np.float32)
    whole = {s: flip_stats(w_a, w_b, s) for s in QUANT_SETTINGS}
    monkeypatch.setattr(quantization, "_ROW_CHUNK", 7)
    for s in QUANT_SETTINGS:
        assert flip_stats(w_a, w_b, s) == whole[s]
        assert whole[s]["n_flipped"] > 0


def test_indivisible_width_is_noted_not_guessed():
    got = flip_stats(np.ones((4, 40), np.float32), np.ones((4, 40), np.float32), "int4")
    assert "divide" in got["note"] and np.isnan(got["flip_share"])
    rows = quantization.flip_rows("m", 0, "mlp", "down", np.ones((4, 96), np.float32), np.ones((4, 96), np.float32))
    assert {r["setting"]: r["attack_quantizes"] for r in rows} == {"int8": True, "int4": False, "int4-g32": True}


def test_the_default_int4_is_torchaos_int4_group_size():
    """int4's group is ``Int4WeightOnlyConfig``'s default; the finer group is reported beside it."""
    torchao = pytest.importorskip("torchao.quantization")
    assert QUANT_SETTINGS["int4"].group_size == INT4_GROUP_SIZE == torchao.Int4WeightOnlyConfig().group_size == 128
    assert QUANT_SETTINGS["int4-g32"].group_size == 32
    assert quantization.PREDICTION_DTYPE == "bfloat16"


def test_bfloat16_prediction_against_float32_measured():
    """The prediction is made in bfloat16 (a GPU's ``--dtype auto``); the CPU attack holds float32.
    On this fixed matrix and update, the flip shares of the two differ by the amounts asserted: the
    deviation of a float32 run from the prediction."""
    rng = np.random.default_rng(5)
    w_a = (rng.standard_normal((256, 256)) * 0.02).astype(np.float32)
    w_b = w_a + (rng.standard_normal(w_a.shape) * 0.02 * 0.3 / 7.5 * 2.5).astype(np.float32)
    for setting, measured in (("int8", 0.0012), ("int4", 0.0001), ("int4-g32", 0.0009)):
        shares = {d: flip_stats(w_a, w_b, setting, d)["flip_share_of_changed"] for d in ("float32", "bfloat16")}
        assert 0.1 < shares["float32"] < 0.95
        # measured: 0.0012 (int8), 0.0001 (int4), 0.0009 (int4-g32) of the changed entries
        assert abs(shares["bfloat16"] - shares["float32"]) == pytest.approx(measured, abs=5e-5), setting


def _clone_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_params_writes_planted_flips(tmp_path):
    """Known answer through ``params``: |dW| < step / 4 everywhere in one matrix gives 0 int8 flips."""
    from unlearn_lens.testing import save_tiny_model

    tiny = save_tiny_model("llama", tmp_path / "tiny")
    rng = np.random.default_rng(3)
    quiet, loud = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    step = 2.0 ** -9

    def centre(t):
        t[quiet] = _bucket_centred(rng, *t[quiet].shape, step)

    base = _clone_with(tiny, tmp_path / "base", centre)

    def update(t):
        dw = (rng.uniform(-0.24, 0.24, size=t[quiet].shape) * step).astype(np.float32)
        dw[:, 0] = 0.0
        t[quiet] = t[quiet] + dw
        t[loud] = t[loud] + np.float32(0.5) * np.abs(t[loud]).max()  # far beyond a step everywhere

    modified = _clone_with(base, tmp_path / "modified", update)
    run_params(str(base), str(modified), tmp_path / "out", steps=("stats",), num_matrices=0)
    path = tmp_path / "out" / "param_stats" / "quantization_flips.csv"
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == FLIP_COLUMNS
        rows = {(r["name"], r["setting"]): r for r in reader}
    names = {name for name, _ in rows}
    assert "model.embed_tokens.weight" in names and len(rows) == len(QUANT_SETTINGS) * len(names)
    assert {r["compute_dtype"] for r in rows.values()} == {"bfloat16"}
    assert int(rows[(quiet, "int8")]["n_changed"]) > 0
    assert int(rows[(quiet, "int8")]["n_flipped"]) == 0 and int(rows[(quiet, "int8")]["n_dequant_changed"]) == 0
    for setting in ("int8", "int4-g32"):  # int4's group of 128 divides none of this model's widths (32, 96)
        assert float(rows[(loud, setting)]["flip_share"]) > 0.5
    # the embedding is not quantized by the attack: flagged, and out of the summary
    assert {rows[("model.embed_tokens.weight", s)]["attack_quantizes"] for s in QUANT_SETTINGS} == {"False"}
    assert rows[(quiet, "int8")]["attack_quantizes"] == "True" and rows[(quiet, "int4")]["attack_quantizes"] == "False"
    summary = json.loads((tmp_path / "out" / "param_stats" / "summary.json").read_text())["quantization_flips"]
    assert summary["int8"]["matrices_changed"] == 2 and summary["int8"]["changed_matrices_erased"] == 1
    assert summary["int8"]["n_flipped"] == sum(int(r["n_flipped"]) for (name, s), r in rows.items()
                                               if s == "int8" and name != "model.embed_tokens.weight")
    assert summary["int8"]["matrices_left_out"] == 1 and summary["int4"]["matrices_left_out"] == len(names)
    assert summary["int4"]["n_entries"] == 0
    untouched = [r for (name, _), r in rows.items() if name not in (quiet, loud) and not r["note"]]
    assert untouched and all(int(r["n_changed"]) == 0 and int(r["n_flipped"]) == 0 for r in untouched)
