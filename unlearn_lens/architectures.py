"""Architecture adapter: where blocks, MLPs, attention, final norm and unembedding live.

One ``ArchSpec`` per family names the module paths; ``ArchitectureAdapter`` resolves them on a
model (a plain ``nn.Module`` or an nnsight wrapper, both navigated by attribute path) and
classifies parameters through the torch-free ``naming`` module. A model outside the known
families can be described with a JSON file (``--arch-spec``) holding the same fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from unlearn_lens.core.errors import UserError
from unlearn_lens.core.naming import MODEL_TYPES, ParamInfo, classify, family_for_model_type


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family (relative to the CausalLM, or to a block)."""

    family: str
    blocks: str  # the ModuleList of transformer blocks
    mlp: str  # relative to a block
    attn: str  # relative to a block
    final_norm: str
    unembed: str
    embed: str


SPECS: dict[str, ArchSpec] = {
    "gpt_neox": ArchSpec("gpt_neox", "gpt_neox.layers", "mlp", "attention",
                         "gpt_neox.final_layer_norm", "lm_head|embed_out", "gpt_neox.embed_in"),
    "llama": ArchSpec("llama", "model.layers", "mlp", "self_attn", "model.norm", "lm_head",
                      "model.embed_tokens"),
    "gpt2": ArchSpec("gpt2", "transformer.h", "mlp", "attn", "transformer.ln_f", "lm_head",
                     "transformer.wte"),
}

_SPEC_HELP = (
    "pass --arch-spec FILE, a JSON object with keys "
    + ", ".join(f.name for f in fields(ArchSpec))
    + ' (e.g. {"family": "llama", "blocks": "model.layers", "mlp": "mlp", "attn": "self_attn", '
    '"final_norm": "model.norm", "unembed": "lm_head", "embed": "model.embed_tokens"})'
)


def get_path(root: Any, path: str) -> Any:
    """Follow a dotted attribute path (digits index into lists) on a module or nnsight envoy.

    ``a|b`` tries the alternatives in order (transformers 5 renamed GPT-NeoX's ``embed_out`` to
    ``lm_head``).
    """
    if "|" in path:
        for alternative in path.split("|"):
            if _has_path(root, alternative):
                return get_path(root, alternative)
        raise AttributeError(path)
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _has_path(root: Any, path: str) -> bool:
    try:
        get_path(root, path)
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    return True


def load_arch_spec(path: str | Path) -> ArchSpec:
    """Read a user-supplied architecture description (JSON)."""
    try:
        data = json.loads(Path(path).read_text())
        return ArchSpec(**data)
    except FileNotFoundError:
        raise UserError(f"{path}: no such architecture spec file") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{path}: invalid architecture spec ({exc}); {_SPEC_HELP}") from None


def spec_for_model(model: Any, arch_spec: ArchSpec | str | Path | None = None) -> ArchSpec:
    """Pick the spec for a model by its config's ``model_type``, checking every path resolves."""
    if isinstance(arch_spec, (str, Path)):
        arch_spec = load_arch_spec(arch_spec)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if arch_spec is None:
        if model_type not in MODEL_TYPES:
            raise UserError(
                f"unknown architecture model_type={model_type!r} (supported: "
                f"{', '.join(sorted(MODEL_TYPES))}); {_SPEC_HELP}"
            )
        arch_spec = SPECS[family_for_model_type(model_type)]
    missing = [p for p in (arch_spec.blocks, arch_spec.final_norm, arch_spec.unembed, arch_spec.embed)
               if not _has_path(model, p)]
    if not missing:
        first_block = get_path(model, arch_spec.blocks)[0]
        missing = [f"{arch_spec.blocks}.0.{p}" for p in (arch_spec.mlp, arch_spec.attn)
                   if not _has_path(first_block, p)]
    if missing:
        raise UserError(
            f"model_type={model_type!r}: could not find module(s) {', '.join(missing)}; {_SPEC_HELP}"
        )
    return arch_spec


class ArchitectureAdapter:
    """Uniform access to a causal LM's parts, whatever its family."""

    def __init__(self, model: Any, arch_spec: ArchSpec | str | Path | None = None):
        self.model = model
        self.spec = spec_for_model(model, arch_spec)
        self.family = self.spec.family

    # --- modules -------------------------------------------------------------------------
    @property
    def blocks(self) -> Any:
        return get_path(self.model, self.spec.blocks)

    @property
    def num_layers(self) -> int:
        return len(get_path(self.model, self.spec.blocks))

    def block(self, index: int, root: Any = None) -> Any:
        """Block ``index`` of ``root`` (default the model; pass an nnsight envoy to trace)."""
        return get_path(root if root is not None else self.model, self.spec.blocks)[index]

    def mlp(self, index: int, root: Any = None) -> Any:
        return get_path(self.block(index, root), self.spec.mlp)

    def attn(self, index: int, root: Any = None) -> Any:
        return get_path(self.block(index, root), self.spec.attn)

    def final_norm(self, root: Any = None) -> Any:
        return get_path(root if root is not None else self.model, self.spec.final_norm)

    def unembed(self, root: Any = None) -> Any:
        return get_path(root if root is not None else self.model, self.spec.unembed)

    def embed(self, root: Any = None) -> Any:
        return get_path(root if root is not None else self.model, self.spec.embed)

    # --- final norm description (what the logit lens needs without the model) -------------
    def final_norm_description(self) -> dict[str, Any]:
        """Type, epsilon, weight and bias (numpy float32) of the final norm."""
        norm = self.final_norm()
        kind = "layernorm" if hasattr(norm, "bias") and norm.bias is not None else "rmsnorm"
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5
        offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
        weight = norm.weight.detach().float().cpu().numpy() + offset
        bias = norm.bias.detach().float().cpu().numpy() if kind == "layernorm" else None
        return {"kind": kind, "eps": float(eps), "weight": weight, "bias": bias}

    # --- parameters ----------------------------------------------------------------------
    def classify(self, name: str) -> ParamInfo:
        """(layer, group, role) of a parameter name of this model."""
        return classify(name, self.family)

    def parameter_names(self, roles: set[str] | None = None, layers: set[int] | None = None,
                        groups: set[str] | None = None) -> list[str]:
        """Names of parameters selected by role, layer and group, through the adapter (never by index)."""
        selected = []
        for name, _ in self.model.named_parameters():
            info = self.classify(name)
            if roles is not None and info.role not in roles:
                continue
            if layers is not None and info.layer not in layers:
                continue
            if groups is not None and info.group not in groups:
                continue
            selected.append(name)
        return selected

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.spec), "num_layers": self.num_layers}
