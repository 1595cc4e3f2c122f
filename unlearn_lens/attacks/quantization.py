"""Quantization attack: the modified model quantized as a user would, then evaluated.

Zhang et al. 2024 ("Does your LLM truly unlearn? An embarrassingly simple approach to recover
unlearned knowledge", arXiv:2410.16454) show that 4-bit quantization restores much of what
gradient-based unlearning hid: the unlearning update is small, so rounding to the quantization
grid maps many unlearned weights back onto the base model's grid points. Here the weights are
quantized with real libraries, not a simulation:

* **torchao** (CPU and GPU), weight-only, symmetric: ``int8`` = ``Int8WeightOnlyConfig()`` (one
  scale per output row); ``int4`` = ``IntxWeightOnlyConfig(weight_dtype=torch.int4,
  granularity=PerGroup(128))``, one scale per 128 input weights, the group size of torchao's own
  ``Int4WeightOnlyConfig``; ``int4-g32`` the same with groups of 32. ``Int4WeightOnlyConfig``
  itself has no CPU path in torchao 0.18 (its packings need CUDA kernels) and is asymmetric (a
  zero point per group, tinygemm's qparams); the generic config is symmetric. A layer whose input
  width the group does not divide stays unquantized, as ``Int4WeightOnlyConfig`` leaves it (on
  SmolLM2, width 576, group 128 quantizes the 30 MLP down projections only).
* **bitsandbytes** (CPU and GPU; bitsandbytes >= 0.50 quantizes on the CPU): ``bnb-fp4`` is what Zhang
  et al.'s code loads (zzwjames/FailureLLMUnlearning, ``utils.py: load_model``:
  ``BitsAndBytesConfig(load_in_4bit=True)`` with ``torch_dtype=torch.bfloat16``: FP4, one absmax
  per block of 64 weights, quantized from bfloat16); ``bnb-nf4`` the same with NF4;
  ``bnb-int8`` LLM.int8() (``load_in_8bit=True``, quantized from float16, threshold 6.0).

Which weights: every ``torch.nn.Linear`` inside the model except the output head (``lm_head``,
also the tied input embedding in most small models), which stays in full precision by default,
as transformers' bitsandbytes integration (so Zhang et al.) keeps it (``quant_lm_head`` includes it).
GPT-2's ``Conv1D`` layers (``x @ W + b`` with W stored (in, out)) are first replaced by the
``nn.Linear`` computing the same function (W transposed), then quantized like the others.
Embeddings, norms and biases are never quantized. The base under the same quantization is the
control row.
"""

from __future__ import annotations

import math
from typing import Iterator

from analyses.weights.quantization import QUANT_SETTINGS
from unlearn_lens.attacks.base import METRICS, AttackContext, AttackResult, metric_values, per_item_values
from unlearn_lens.core.errors import UserError

#: This attack's options (``AttackSettings.options``) and their defaults.
ATTACK_OPTIONS = {
    "quant_settings": ("int8", "int4", "int4-g32"),  # torchao settings (keys of quantization.QUANT_SETTINGS)
    "quant_bitsandbytes": ("bnb-fp4", "bnb-nf4", "bnb-int8"),  # bitsandbytes settings run where it imports
    "quant_lm_head": False,               # quantize the output head too
}
BNB_SETTINGS = ("bnb-int8", "bnb-fp4", "bnb-nf4")
#: bitsandbytes 4-bit block size (``Params4bit``'s and transformers' default).
BNB_BLOCKSIZE = 64
OUTPUT_HEADS = ("lm_head", "embed_out")  # Llama/GPT-2 and GPT-NeoX names of the unembedding
TARGETS = (("modified", "modified"), ("control", "base"))  # (row target, model loaded)
_SWITCH = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "none": False}


def _option(ctx: AttackContext, name: str):
    """An option's value (or its default); strings from the command line are read as the default's type."""
    value = ctx.settings.options.get(name, ATTACK_OPTIONS[name])
    if isinstance(ATTACK_OPTIONS[name], tuple):
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, bool):  # a switch: every setting or none
            return ATTACK_OPTIONS[name] if value else ()
        if len(value) == 1 and str(value[0]).lower() in _SWITCH:
            return ATTACK_OPTIONS[name] if _SWITCH[str(value[0]).lower()] else ()
        return tuple(value)
    if isinstance(value, str) and isinstance(ATTACK_OPTIONS[name], bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return value


def _torchao():
    try:
        import torchao.quantization as quantization
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise UserError("the quantize attack needs torchao: pip install 'unlearn-lens[models]' "
                        "(or pip install torchao)") from None
    return quantization, PerGroup


def conv1d_to_linear(model) -> int:
    """Replace every transformers ``Conv1D`` (GPT-2's ``x @ W + b``, W stored (in, out)) by the
    ``nn.Linear`` computing the same function (weight W^T), in place; returns how many."""
    import torch
    from transformers.pytorch_utils import Conv1D

    found = [(name, module) for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name, module in found:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        n_in, n_out = module.weight.shape
        linear = torch.nn.Linear(n_in, n_out, bias=module.bias is not None, device=module.weight.device,
                                 dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.train(module.training)
        setattr(parent, child_name, linear)
    return len(found)


def selected_linears(model, lm_head: bool = False) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules the attack quantizes."""
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and (lm_head or name.split(".")[-1] not in OUTPUT_HEADS)]


def quantize_torchao(model, setting: str, lm_head: bool = False) -> int:
    """Quantize ``model``'s selected linear weights in place with torchao; returns how many (0: no
    layer's width divides into the setting's groups, nothing changed)."""
    import torch

    if setting not in QUANT_SETTINGS:
        raise UserError(f"quant_settings: unknown setting {setting!r}; choose from {', '.join(QUANT_SETTINGS)}")
    quantization, PerGroup = _torchao()
    conv1d_to_linear(model)
    names = set(selected_linears(model, lm_head))
    if not names:
        raise UserError(f"quantize {setting}: the model has no linear layer to quantize")
    group = QUANT_SETTINGS[setting].group_size
    if group is not None:
        # a group must fit the row: layers whose input width is not a multiple of the group stay as they are
        modules = dict(model.named_modules())
        names = {n for n in names if modules[n].in_features % group == 0}
        config = quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
    else:
        config = quantization.Int8WeightOnlyConfig()
    if names:
        quantization.quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    return len(names)


def bitsandbytes_available() -> bool:
    """True when bitsandbytes is installed (>= 0.50 quantizes on the CPU too)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def quantize_bitsandbytes(model, setting: str, lm_head: bool = False) -> int:
    """Replace the selected linear layers by bitsandbytes 8-bit (LLM.int8()) or 4-bit FP4 / NF4 layers,
    as transformers' ``BitsAndBytesConfig(load_in_8bit / load_in_4bit=True)`` loading builds them:
    4-bit from bfloat16 weights (Zhang et al.'s ``torch_dtype``), blocks of 64; 8-bit from float16."""
    import logging

    import torch

    # bitsandbytes' CPU backend logs a warning when an optional hub kernel is not there; it falls back
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    conv1d_to_linear(model)
    names = selected_linears(model, lm_head)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child_name)
        four_bit = setting in ("bnb-fp4", "bnb-nf4")
        # 4-bit: BitsAndBytesConfig's default bnb_4bit_compute_dtype (float32); 8-bit casts to the input's dtype
        compute = torch.float32 if four_bit else linear.weight.dtype
        weight = linear.weight.data.detach().to("cpu", torch.bfloat16 if four_bit else torch.float16)
        has_bias = linear.bias is not None
        if four_bit:
            kind = setting.split("-")[1]
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                      compute_dtype=compute, quant_type=kind)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind, blocksize=BNB_BLOCKSIZE,
                                             compress_statistics=False)  # transformers: no double quantization
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            layer.bias = torch.nn.Parameter(linear.bias.data.detach().to("cpu", compute), requires_grad=False)
        layer.train(linear.training)  # bitsandbytes' CPU kernels differ in training mode
        if four_bit and linear.in_features % BNB_BLOCKSIZE:
            layer.support_avx512bf16_for_cpu = False  # its packed CPU kernel needs whole blocks per row
        setattr(parent, child_name, layer.to(device))  # moving to a device is what quantizes
    return len(names)


def _settings(ctx: AttackContext) -> list[tuple[str, str]]:
    """(backend, setting) pairs this run applies."""
    chosen = [str(s) for s in _option(ctx, "quant_settings")]
    unknown = [s for s in chosen if s not in QUANT_SETTINGS]
    if unknown:
        raise UserError(f"quant_settings: unknown {', '.join(unknown)}; choose from {', '.join(QUANT_SETTINGS)}")
    bnb = [str(s) for s in _option(ctx, "quant_bitsandbytes")]
    unknown = [s for s in bnb if s not in BNB_SETTINGS]
    if unknown:
        raise UserError(f"quant_bitsandbytes: unknown {', '.join(unknown)}; choose from {', '.join(BNB_SETTINGS)} "
                        "or false")
    pairs = [("torchao", s) for s in chosen]
    if bnb and bitsandbytes_available():
        pairs += [("bitsandbytes", s) for s in bnb]
    elif bnb:
        ctx.progress("quantize: bitsandbytes is not installed; its settings are skipped (pip install bitsandbytes)")
    return pairs


def run(ctx: AttackContext) -> Iterator[AttackResult]:
    """Each setting on the modified model and on the base (control), evaluated on the run's data.

    A setting that quantizes no layer (no input width divides into its groups) is not evaluated:
    its rows have NaN metrics, ``quantized_layers`` 0 and say so.
    """
    lm_head = bool(_option(ctx, "quant_lm_head"))
    pairs = _settings(ctx)
    if any(backend == "torchao" for backend, _ in pairs):
        _torchao()  # a missing package is one line before any model loads
    for backend, setting in pairs:
        for target, which in TARGETS:
            def compute(which: str = which, target: str = target, backend: str = backend,
                        setting: str = setting) -> dict:
                ctx.progress(f"quantize {setting} ({backend}): {target}")
                model, tokenizer = ctx.load(which)
                quantize = quantize_torchao if backend == "torchao" else quantize_bitsandbytes
                count = quantize(model, setting, lm_head)
                if count == 0:
                    return {**{m: math.nan for m in METRICS}, "quantized_layers": 0}
                return {**ctx.evaluate(model, tokenizer), "quantized_layers": count}

            # the control (the base quantized) is the same for every modified model: memoised
            transform = {"attack": "quantize", "backend": backend, "setting": setting, "lm_head": lm_head,
                         "version": 2}
            result, seconds = ctx.memoised(which, transform, compute, what=f"quantize {setting} ({backend}): {target}")
            count = int(result["quantized_layers"])
            yield AttackResult("quantize", setting, target, metric_values(result), seconds,
                               extra={"backend": backend, "quantized_layers": count, "lm_head_quantized": lm_head,
                                      "group_size": _group(backend, setting),
                                      "skipped": "" if count else "no layer's input width divides into its groups"},
                               per_item=per_item_values(result))


def _group(backend: str, setting: str) -> int | None:
    """Weights sharing one scale: the int4 group, the bitsandbytes 4-bit block, None for a row (int8)."""
    if backend == "bitsandbytes":
        return BNB_BLOCKSIZE if setting != "bnb-int8" else None
    return QUANT_SETTINGS[setting].group_size
