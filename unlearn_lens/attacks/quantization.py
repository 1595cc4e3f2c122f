"""Quantization attack: the modified model quantized as a user would, then evaluated.

Zhang et al. 2024 ("Does your LLM truly unlearn? An embarrassingly simple approach to recover
unlearned knowledge", arXiv:2410.16454) show that 4-bit quantization restores much of what
gradient-based unlearning hid: the unlearning update is small, so rounding to the quantization
grid maps many unlearned weights back onto the base model's grid points. Here the weights are
quantized with a real library, not a simulation:

* **torchao** (CPU and GPU), weight-only: ``quantize_(model, Int8WeightOnlyConfig())`` (int8,
  symmetric, one scale per output row) and ``quantize_(model, IntxWeightOnlyConfig(
  weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE)))`` (int4, symmetric, one scale
  per group of ``INT4_GROUP_SIZE`` input weights). ``Int4WeightOnlyConfig`` needs a CUDA kernel,
  so the int4 setting uses the generic ``IntxWeightOnlyConfig``.
* **bitsandbytes** (only where CUDA is present and the package imports): LLM.int8()
  (``Linear8bitLt``) and 4-bit FP4 and NF4 (``Linear4bit``). Zhang et al.'s code
  (zzwjames/FailureLLMUnlearning, ``utils.py: load_model``) loads models through transformers'
  ``BitsAndBytesConfig(load_in_8bit=True)`` / ``(load_in_4bit=True)``, whose 4-bit default is FP4.

Which weights: every ``torch.nn.Linear`` inside the model except the output head (``lm_head``,
also the tied input embedding in most small models), which stays in full precision by default,
as transformers' bitsandbytes integration (so Zhang et al.) keeps it (``quant_lm_head`` includes it). Embeddings,
norms and biases are never quantized. GPT-2's ``Conv1D`` layers are not ``nn.Linear``: a model
with no quantizable layer is refused. The base under the same quantization is the control row.
"""

from __future__ import annotations

from typing import Iterator

from analyses.weights.quantization import INT4_GROUP_SIZE, QUANT_SETTINGS
from unlearn_lens.attacks.base import METRICS, AttackContext, AttackResult
from unlearn_lens.core.errors import UserError

#: This attack's options (``AttackSettings.options``) and their defaults.
ATTACK_OPTIONS = {
    "quant_settings": ("int8", "int4"),   # torchao settings (keys of analyses.weights.quantization.QUANT_SETTINGS)
    "quant_bitsandbytes": True,           # also bnb-int8 / bnb-fp4 / bnb-nf4 when CUDA and bitsandbytes are present
    "quant_lm_head": False,               # quantize the output head too
}
BNB_SETTINGS = ("bnb-int8", "bnb-fp4", "bnb-nf4")
OUTPUT_HEADS = ("lm_head", "embed_out")  # Llama/GPT-2 and GPT-NeoX names of the unembedding
TARGETS = (("modified", "modified"), ("control", "base"))  # (row target, model loaded)


def _option(ctx: AttackContext, name: str):
    """An option's value (or its default); strings from the command line are read as the default's type."""
    value = ctx.settings.options.get(name, ATTACK_OPTIONS[name])
    if isinstance(value, str) and isinstance(ATTACK_OPTIONS[name], tuple):
        return tuple(v.strip() for v in value.split(",") if v.strip())
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


def selected_linears(model, lm_head: bool = False) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules the attack quantizes."""
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and (lm_head or name.split(".")[-1] not in OUTPUT_HEADS)]


def quantize_torchao(model, setting: str, lm_head: bool = False) -> int:
    """Quantize ``model``'s selected linear weights in place with torchao; returns how many."""
    import torch

    if setting not in QUANT_SETTINGS:
        raise UserError(f"quant_settings: unknown setting {setting!r}; choose from {', '.join(QUANT_SETTINGS)}")
    quantization, PerGroup = _torchao()
    names = set(selected_linears(model, lm_head))
    if setting == "int4":
        # a group must fit the row: layers whose input width is not a multiple of the group stay as they are
        modules = dict(model.named_modules())
        names = {n for n in names if modules[n].in_features % INT4_GROUP_SIZE == 0}
        config = quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE))
    else:
        config = quantization.Int8WeightOnlyConfig()
    if not names:
        raise UserError(f"quantize {setting}: the model has no torch.nn.Linear layer to quantize "
                        "(GPT-2-style Conv1D layers are not supported)")
    quantization.quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    return len(names)


def bitsandbytes_available() -> bool:
    """True when CUDA is present and bitsandbytes imports (its quantizers need a GPU)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def quantize_bitsandbytes(model, setting: str, lm_head: bool = False) -> int:
    """Replace the selected linear layers by bitsandbytes 8-bit (LLM.int8()) or 4-bit FP4 / NF4 layers (CUDA)."""
    import bitsandbytes as bnb
    import torch

    device = torch.device("cuda") if next(model.parameters()).device.type != "cuda" else next(model.parameters()).device
    names = selected_linears(model, lm_head)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child_name)
        compute = linear.weight.dtype if linear.weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
        weight = linear.weight.data.detach().to("cpu", torch.float16)
        has_bias = linear.bias is not None
        if setting in ("bnb-fp4", "bnb-nf4"):
            kind = setting.split("-")[1]
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                      compute_dtype=compute, quant_type=kind)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind)
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            layer.bias = torch.nn.Parameter(linear.bias.data.detach().to("cpu", compute), requires_grad=False)
        setattr(parent, child_name, layer.to(device))  # moving to CUDA is what quantizes
    model.to(device)
    return len(names)


def _settings(ctx: AttackContext) -> list[tuple[str, str]]:
    """(backend, setting) pairs this run applies."""
    chosen = [str(s) for s in _option(ctx, "quant_settings")]
    unknown = [s for s in chosen if s not in QUANT_SETTINGS]
    if unknown:
        raise UserError(f"quant_settings: unknown {', '.join(unknown)}; choose from {', '.join(QUANT_SETTINGS)}")
    pairs = [("torchao", s) for s in chosen]
    if _option(ctx, "quant_bitsandbytes") and bitsandbytes_available():
        pairs += [("bitsandbytes", s) for s in BNB_SETTINGS]
    return pairs


def run(ctx: AttackContext) -> Iterator[AttackResult]:
    """Each setting on the modified model and on the base (control), evaluated on the run's data."""
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
                return {**ctx.evaluate(model, tokenizer), "quantized_layers": count}

            # the control (the base quantized) is the same for every modified model: memoised
            transform = {"attack": "quantize", "backend": backend, "setting": setting, "lm_head": lm_head}
            result, seconds = ctx.memoised(which, transform, compute, what=f"quantize {setting} ({backend}): {target}")
            yield AttackResult("quantize", setting, target, {m: result[m] for m in METRICS}, seconds,
                               extra={"backend": backend, "quantized_layers": int(result["quantized_layers"]),
                                      "lm_head_quantized": lm_head})
