"""Weight-only quantization as torchao does it, in numpy: which entries of dW survive quantization.

A user who quantizes an unlearned model gets ``q(W_b)``, not ``W_b``. Where ``q(W_b) = q(W_a)`` the
update is gone and the base model's behaviour comes back (Zhang et al. 2024). This module predicts
that from the weights alone, matrix by matrix: the share of entries whose integer code differs
between base and modified at each setting of ``QUANT_SETTINGS``.

The quantizer is a transcription of torchao 0.18's ``choose_qparams_affine`` + ``quantize_affine``
(``torchao/quantization/quant_primitives.py``) for exactly the configs named below, all
symmetric with zero point 0:

* ``int8``: ``Int8WeightOnlyConfig()`` (``Int8Tensor.from_hp``): one scale per output row,
  ``scale = max(|min(row, 0)|, max(row, 0)) / 127.5`` computed in the weight's dtype, clamped below
  at float32 eps and kept in float32; ``code = clamp(round(w * (1 / scale)), -128, 127)`` in float32.
* ``int4``: ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128))``
  (``IntxUnpackedToInt8Tensor.from_hp``): one scale per group of 128 consecutive input entries of
  a row (the group size of torchao's own ``Int4WeightOnlyConfig``), ``/ 7.5``, clamped at the
  weight dtype's smallest normal and kept in the weight's dtype; the code is computed in that
  dtype too, clamped to [-8, 7]. ``int4-g32``: the same with groups of 32 (finer groups keep
  more of a small update). A matrix whose input width the group does not divide is left
  unquantized, as ``Int4WeightOnlyConfig`` leaves it (it logs and skips).

``round`` is round-half-to-even (``torch.round`` and ``np.rint``). ``compute_dtype`` says which
dtype the model holds when it is quantized (``float32``, ``float16`` or ``bfloat16``); bfloat16
arithmetic is emulated as float32 arithmetic rounded to bfloat16 after every operation, as
PyTorch's CPU kernels do. ``params`` predicts in ``PREDICTION_DTYPE`` (bfloat16: what
``--dtype auto`` holds on a GPU, and what Zhang et al. load); the quantize attack on a CPU holds
float32 (the difference is measured in tests/test_quantization.py).

Rows of matrices the attack does not quantize (embeddings, an untied unembedding, a width the
int4 group does not divide) carry ``attack_quantizes`` False and stay out of ``flip_summary``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Group size of the int4 setting: torchao's ``Int4WeightOnlyConfig`` default (divides Pythia's widths;
#: of SmolLM2's, 1536 but not 576).
INT4_GROUP_SIZE = 128
#: The finer int4 setting, reported too: divides SmolLM2's widths (576, 1536) and Pythia's (512 ... 4096).
INT4_FINE_GROUP_SIZE = 32
#: The dtype ``params`` predicts in: a model's compute dtype on a GPU under ``--dtype auto``.
PREDICTION_DTYPE = "bfloat16"
#: Dtypes a model may hold when it is quantized (the arithmetic of the scales and codes follows it).
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
#: Rows quantized at a time: bounds the temporaries to a few copies of this many rows.
_ROW_CHUNK = 1024


@dataclass(frozen=True)
class QuantSetting:
    """One weight-only quantization setting (symmetric, zero point 0), as torchao builds it.

    ``group_size`` None: one scale per output channel (row); otherwise per group of that many
    consecutive input entries. ``scale_in_weight_dtype``: the scale is kept in the weight's dtype
    (and the code computed in it) rather than in float32. ``eps``: ``"float32_eps"`` or
    ``"dtype_smallest_normal"``, the lower bound of a scale.
    """

    name: str
    weight_dtype: str  # torch dtype name of the codes: "int8" / "int4"
    qmin: int
    qmax: int
    group_size: int | None
    scale_in_weight_dtype: bool
    eps: str
    torchao_config: str  # how the attack side builds it, for people reading the outputs


#: Setting name -> parameters; the attack side builds its torchao configs from these.
QUANT_SETTINGS: dict[str, QuantSetting] = {
    "int8": QuantSetting("int8", "int8", -128, 127, None, False, "float32_eps", "Int8WeightOnlyConfig()"),
    "int4": QuantSetting("int4", "int4", -8, 7, INT4_GROUP_SIZE, True, "dtype_smallest_normal",
                         f"IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup({INT4_GROUP_SIZE}))"),
    "int4-g32": QuantSetting("int4-g32", "int4", -8, 7, INT4_FINE_GROUP_SIZE, True, "dtype_smallest_normal",
                             "IntxWeightOnlyConfig(weight_dtype=torch.int4, "
                             f"granularity=PerGroup({INT4_FINE_GROUP_SIZE}))"),
}

FLIP_COLUMNS = [
    "name", "layer", "group", "role", "setting", "shape0", "shape1", "compute_dtype", "n_entries", "n_changed",
    "n_flipped", "flip_share", "n_flipped_changed", "flip_share_of_changed", "n_dequant_changed",
    "dequant_change_share", "n_groups", "n_scale_changed", "step_min", "step_median", "step_max",
    "dW_over_step_mean", "dW_over_step_max", "attack_quantizes", "note",
]


def round_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


class _Arith:
    """Arithmetic in one of ``COMPUTE_DTYPES``: values held as float32 (bfloat16) or natively."""

    def __init__(self, dtype: str):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
        self.name = dtype
        self.native = np.float16 if dtype == "float16" else np.float32

    def cast(self, x: Any) -> np.ndarray:
        if self.name == "bfloat16":
            return round_bfloat16(np.asarray(x, dtype=np.float32))
        return np.asarray(x).astype(self.native, copy=False)

    def smallest_normal(self) -> float:
        return {"float32": float(np.finfo(np.float32).tiny), "float16": float(np.finfo(np.float16).tiny),
                "bfloat16": float(np.finfo(np.float32).tiny)}[self.name]


def _blocks(w: np.ndarray, setting: QuantSetting) -> np.ndarray:
    """``w`` (rows, cols) viewed as (rows, groups, group_size)."""
    rows, cols = w.shape
    size = cols if setting.group_size is None else setting.group_size
    if cols % size:
        raise ValueError(f"{setting.name}: {cols} input entries do not divide into groups of {size}")
    return w.reshape(rows, cols // size, size)


def quantize_codes(w: np.ndarray, setting: QuantSetting | str,
                   compute_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scales, zero_points)`` of a 2-D weight (out, in) under one setting, as torchao gives them.

    ``codes`` int8 (out, in); ``scales`` float32 (out, groups) (values of the dtype torchao keeps
    them in); ``zero_points`` int8 zeros (out, groups). ``w`` is first cast to ``compute_dtype``.
    """
    setting = QUANT_SETTINGS[setting] if isinstance(setting, str) else setting
    arith = _Arith(compute_dtype)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    x = _blocks(arith.cast(w), setting)
    max_pos = np.maximum(-np.minimum(x.min(axis=2), 0), np.maximum(x.max(axis=2), 0))
    scale = arith.cast(max_pos / arith.cast((setting.qmax - setting.qmin) / 2))  # in the weight dtype
    eps = float(np.finfo(np.float32).eps) if setting.eps == "float32_eps" else arith.smallest_normal()
    scale = np.maximum(scale, arith.cast(eps))
    if setting.scale_in_weight_dtype:
        inverse = arith.cast(arith.cast(1.0) / scale)
        scaled = arith.cast(x * inverse[:, :, None])
    else:
        scale = scale.astype(np.float32)
        inverse = np.float32(1.0) / scale
        scaled = x.astype(np.float32, copy=False) * inverse[:, :, None]
    np.rint(scaled, out=scaled)
    np.clip(scaled, setting.qmin, setting.qmax, out=scaled)
    codes = scaled.astype(np.int8).reshape(w.shape)
    scales = scale.astype(np.float32)
    return codes, scales, np.zeros(scales.shape, dtype=np.int8)


def dequantize(codes: np.ndarray, scales: np.ndarray, setting: QuantSetting | str) -> np.ndarray:
    """``codes * scale`` per group, float32 (the weight a quantized model multiplies by; zero point 0)."""
    setting = QUANT_SETTINGS[setting] if isinstance(setting, str) else setting
    grouped = _blocks(codes.astype(np.float32), setting)
    return (grouped * scales[:, :, None]).reshape(codes.shape)


def flip_stats(w_a: np.ndarray, w_b: np.ndarray, setting: QuantSetting | str,
               compute_dtype: str = "float32") -> dict[str, Any]:
    """Per-matrix quantization-flip counts of ``W_b`` against ``W_a``, row chunk by row chunk.

    ``n_flipped``: entries whose integer code differs; ``n_dequant_changed``: entries whose
    dequantized value differs (code or scale changed): where it is 0 the quantized models are
    identical and quantization erases the update. ``dW_over_step_*``: |dW| / base step over the
    changed entries (a flip needs about 0.5 or more unless the scale moves).
    """
    setting = QUANT_SETTINGS[setting] if isinstance(setting, str) else setting
    rows, cols = w_a.shape
    out: dict[str, Any] = {"setting": setting.name, "compute_dtype": compute_dtype, "n_entries": rows * cols,
                           "note": ""}
    size = cols if setting.group_size is None else setting.group_size
    if cols % size:  # torchao refuses such a matrix: no prediction
        blank = {k: math.nan for k in FLIP_COLUMNS[FLIP_COLUMNS.index("n_changed"):-1]}
        return {**blank, **out, "note": f"{cols} input entries do not divide into groups of {size}"}
    totals = dict.fromkeys(("n_changed", "n_flipped", "n_flipped_changed", "n_dequant_changed", "n_scale_changed"), 0)
    ratio_sum, ratio_max, steps = 0.0, 0.0, []
    for start in range(0, rows, _ROW_CHUNK):
        a, b = w_a[start:start + _ROW_CHUNK], w_b[start:start + _ROW_CHUNK]
        codes_a, scales_a, _ = quantize_codes(a, setting, compute_dtype)
        codes_b, scales_b, _ = quantize_codes(b, setting, compute_dtype)
        changed = a != b
        flipped = codes_a != codes_b
        scale_moved = scales_a != scales_b
        shape = (a.shape[0], scales_a.shape[1], size)
        dequant = flipped.reshape(shape) | (scale_moved[:, :, None] & (codes_b != 0).reshape(shape))  # 0 at any scale
        totals["n_changed"] += int(np.count_nonzero(changed))
        totals["n_flipped"] += int(np.count_nonzero(flipped))
        totals["n_flipped_changed"] += int(np.count_nonzero(flipped & changed))
        totals["n_dequant_changed"] += int(np.count_nonzero(dequant))
        totals["n_scale_changed"] += int(np.count_nonzero(scale_moved))
        steps.append(scales_a.ravel())
        # |dW| / step over every entry: unchanged ones add 0 to the sum and cannot be the maximum
        ratio = np.abs(b - a, dtype=np.float32).reshape(shape) / scales_a[:, :, None]
        ratio_sum += float(ratio.sum(dtype=np.float64))
        ratio_max = max(ratio_max, float(ratio.max()))
    all_steps = np.concatenate(steps) if steps else np.zeros(0, dtype=np.float32)
    n = rows * cols
    return {
        **out, **totals,
        "flip_share": totals["n_flipped"] / n if n else 0.0,
        "flip_share_of_changed": totals["n_flipped_changed"] / totals["n_changed"] if totals["n_changed"] else 0.0,
        "dequant_change_share": totals["n_dequant_changed"] / n if n else 0.0,
        "n_groups": int(all_steps.size),
        "step_min": float(all_steps.min()) if all_steps.size else 0.0,
        "step_median": float(np.median(all_steps)) if all_steps.size else 0.0,
        "step_max": float(all_steps.max()) if all_steps.size else 0.0,
        "dW_over_step_mean": ratio_sum / totals["n_changed"] if totals["n_changed"] else 0.0,
        "dW_over_step_max": ratio_max,
    }


def flip_rows(name: str, layer: int, group: str, role: str, w_a: np.ndarray, w_b: np.ndarray,
              compute_dtype: str = PREDICTION_DTYPE) -> list[dict[str, Any]]:
    """Rows of ``quantization_flips.csv`` for one matrix, one per setting of ``QUANT_SETTINGS``.

    ``attack_quantizes``: whether the quantize attack quantizes this matrix at that setting: the
    blocks' matrices (``layer >= 0``) whose width the setting's groups divide; never an embedding
    or the unembedding (kept in full precision by default, as transformers' bitsandbytes loading does).
    """
    head = {"name": name, "layer": layer, "group": group, "role": role, "shape0": w_a.shape[0],
            "shape1": w_a.shape[1]}
    rows = []
    for setting in QUANT_SETTINGS.values():
        stats = flip_stats(w_a, w_b, setting, compute_dtype)
        rows.append({**head, **stats, "attack_quantizes": layer >= 0 and not stats["note"]})
    return rows


def flip_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting, over the matrices the attack quantizes: entries, changed entries, flips and the
    share of changed that flip; ``matrices_left_out`` counts the others (embeddings, indivisible widths)."""
    summary: dict[str, dict[str, Any]] = {}
    for setting in QUANT_SETTINGS:
        chosen = [r for r in rows if r["setting"] == setting and _quantized(r)]
        total = {k: int(sum(r[k] for r in chosen)) for k in ("n_entries", "n_changed", "n_flipped",
                                                              "n_flipped_changed", "n_dequant_changed")}
        summary[setting] = {
            **total,
            "flip_share_of_changed": total["n_flipped_changed"] / total["n_changed"] if total["n_changed"] else 0.0,
            "matrices_changed": sum(1 for r in chosen if r["n_changed"] > 0),
            # changed matrices whose quantized form is the base's: the update is erased there
            "changed_matrices_erased": sum(1 for r in chosen if r["n_changed"] > 0 and r["n_dequant_changed"] == 0),
            "matrices_left_out": sum(1 for r in rows if r["setting"] == setting and not _quantized(r)),
            "compute_dtype": sorted({str(r["compute_dtype"]) for r in chosen}),
            "torchao_config": QUANT_SETTINGS[setting].torchao_config,
        }
    return summary


def _quantized(row: dict[str, Any]) -> bool:
    """Whether the attack quantizes a row's matrix (read back from a CSV, the flag is text)."""
    flag = row.get("attack_quantizes", True)
    return (flag if isinstance(flag, bool) else str(flag) == "True") and not row.get("note")
