"""Torch-free classification of parameter names by architecture family.

Maps every parameter name of a GPT-NeoX, Llama-style or GPT-2 checkpoint to
``ParamInfo(layer, group, role)`` and normalises weight orientation to
(out_features, in_features). Used by the model-side adapter and by `analyses/`, which reads
checkpoints without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from unlearn_lens.core.errors import UserError

FAMILIES = ("gpt_neox", "llama", "gpt2")

#: HF ``model_type`` values handled by each family.
MODEL_TYPES: dict[str, str] = {
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "smollm3": "llama",
    "gemma": "llama",
    "olmo": "llama",
    "gpt2": "gpt2",
}


@dataclass(frozen=True)
class ParamInfo:
    """Where a parameter sits: block index (-1 outside blocks), group and role."""

    layer: int
    group: str  # "attn" | "mlp" | "other"
    role: str  # qkv, q, k, v, out, up, gate, down, norm, embed, pos_embed, unembed, final_norm, other


# (regex on the name after the block prefix, group, role). Order matters: first match wins.
_BLOCK_RULES: dict[str, list[tuple[str, str, str]]] = {
    "gpt_neox": [
        (r"attention\.query_key_value\.", "attn", "qkv"),
        (r"attention\.dense\.", "attn", "out"),
        (r"attention\.", "attn", "other"),
        (r"mlp\.dense_h_to_4h\.", "mlp", "up"),
        (r"mlp\.dense_4h_to_h\.", "mlp", "down"),
        (r"input_layernorm\.", "attn", "norm"),
        (r"post_attention_layernorm\.", "mlp", "norm"),
    ],
    "llama": [
        (r"self_attn\.q_proj\.", "attn", "q"),
        (r"self_attn\.k_proj\.", "attn", "k"),
        (r"self_attn\.v_proj\.", "attn", "v"),
        (r"self_attn\.o_proj\.", "attn", "out"),
        (r"self_attn\.", "attn", "other"),
        (r"mlp\.gate_proj\.", "mlp", "gate"),
        (r"mlp\.up_proj\.", "mlp", "up"),
        (r"mlp\.down_proj\.", "mlp", "down"),
        (r"input_layernorm\.", "attn", "norm"),
        (r"post_attention_layernorm\.", "mlp", "norm"),
        (r"pre_feedforward_layernorm\.|post_feedforward_layernorm\.", "mlp", "norm"),
    ],
    "gpt2": [
        (r"attn\.c_attn\.", "attn", "qkv"),
        (r"attn\.c_proj\.", "attn", "out"),
        (r"attn\.", "attn", "other"),
        (r"mlp\.c_fc\.", "mlp", "up"),
        (r"mlp\.c_proj\.", "mlp", "down"),
        (r"ln_1\.", "attn", "norm"),
        (r"ln_2\.", "mlp", "norm"),
    ],
}

_BLOCK_PREFIX: dict[str, str] = {
    "gpt_neox": r"^(?:gpt_neox\.)?layers\.(\d+)\.(.*)$",
    "llama": r"^(?:model\.)?layers\.(\d+)\.(.*)$",
    "gpt2": r"^(?:transformer\.)?h\.(\d+)\.(.*)$",
}

_GLOBAL_RULES: dict[str, list[tuple[str, str]]] = {
    "gpt_neox": [
        (r"^(?:gpt_neox\.)?embed_in\.", "embed"),
        (r"^(?:embed_out|lm_head)\.", "unembed"),
        (r"^(?:gpt_neox\.)?final_layer_norm\.", "final_norm"),
    ],
    "llama": [
        (r"^(?:model\.)?embed_tokens\.", "embed"),
        (r"^lm_head\.", "unembed"),
        (r"^(?:model\.)?norm\.", "final_norm"),
    ],
    "gpt2": [
        (r"^(?:transformer\.)?wte\.", "embed"),
        (r"^(?:transformer\.)?wpe\.", "pos_embed"),
        (r"^lm_head\.", "unembed"),
        (r"^(?:transformer\.)?ln_f\.", "final_norm"),
    ],
}

#: Roles whose weights are linear maps (analysed as matrices).
LINEAR_ROLES = frozenset({"qkv", "q", "k", "v", "out", "up", "gate", "down"})
#: Roles of the MLP's input-side matrices (they multiply the MLP input).
MLP_INPUT_ROLES = frozenset({"up", "gate"})
#: Roles of the matrices that write into the residual stream (attention output, MLP down-projection).
STREAM_WRITE_ROLES = frozenset({"out", "down"})
#: Roles of the 2-D weights outside the blocks: token and position embeddings, unembedding.
EMBED_ROLES = frozenset({"embed", "pos_embed", "unembed"})


def family_for_model_type(model_type: str | None) -> str:
    """Family name for an HF ``config.model_type``; a clear error for anything unsupported."""
    family = MODEL_TYPES.get(str(model_type))
    if family is None:
        raise UserError(
            f"unsupported architecture model_type={model_type!r}: supported are "
            f"{', '.join(sorted(MODEL_TYPES))}; for another model pass --arch-spec FILE "
            "(JSON naming blocks, mlp, attn, final_norm, unembed, embed module paths)"
        )
    return family


def family_from_config(config: Mapping[str, Any]) -> str:
    """Family of a checkpoint from its ``config.json`` contents."""
    return family_for_model_type(config.get("model_type"))


def classify(name: str, family: str) -> ParamInfo:
    """Classify one parameter name; raises UserError for a name the family does not know."""
    if family not in _BLOCK_PREFIX:
        raise UserError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    match = re.match(_BLOCK_PREFIX[family], name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        for pattern, group, role in _BLOCK_RULES[family]:
            if re.match(pattern, rest):
                return ParamInfo(layer, group, role)
        return ParamInfo(layer, "other", "other")
    for pattern, role in _GLOBAL_RULES[family]:
        if re.match(pattern, name):
            return ParamInfo(-1, "other", role)
    return ParamInfo(-1, "other", "other")


def is_transposed(name: str, family: str) -> bool:
    """True where the checkpoint stores a linear weight as (in, out): GPT-2's Conv1D."""
    if family != "gpt2" or not name.endswith(".weight"):
        return False
    return classify(name, family).role in LINEAR_ROLES


def orient(name: str, array: Any, family: str) -> Any:
    """Return a 2-D weight as (out_features, in_features) whatever the storage convention."""
    return array.T if is_transposed(name, family) else array


def is_linear_weight(name: str, family: str, ndim: int) -> bool:
    """True for the 2-D weights the parameter diagnostics analyse (attention and MLP matrices)."""
    if ndim != 2 or not name.endswith(".weight"):
        return False
    info = classify(name, family)
    return info.layer >= 0 and info.role in LINEAR_ROLES


def is_embedding_weight(name: str, family: str, ndim: int) -> bool:
    """True for the 2-D embedding, position-embedding and unembedding weights (outside the blocks)."""
    if ndim != 2 or not name.endswith(".weight"):
        return False
    info = classify(name, family)
    return info.layer < 0 and info.role in EMBED_ROLES
