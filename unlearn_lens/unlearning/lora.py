"""LoRA wrapping: which modules get adapters, by name or by a named rule.

``--lora-targets`` takes module names or one rule:

- ``all-linear`` (the default): every attention and MLP linear of the family. PEFT's own default
  for GPT-NeoX adapts only ``query_key_value``, which would make any LoRA edit look
  attention-localised.
- ``peft-default``: PEFT's per-architecture default for the model's ``model_type``
  (``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: ``query_key_value``
  for GPT-NeoX, ``q_proj, v_proj`` for Llama, ``c_attn`` for GPT-2), what ``LoraConfig(
  target_modules=None)`` resolves to. Deep ignorance (EleutherAI/unlearn ``unlearn/reference/cas/
  unlearning.py``) passes ``None`` for every model but OLMo, for which it names every linear; where
  PEFT has no default (OLMo, SmolLM3) this rule therefore takes every linear too.

GPT-2 stores its linears as ``Conv1D`` (in, out), which needs ``fan_in_fan_out=True``.
"""

from __future__ import annotations

from unlearn_lens.core.errors import UserError

#: every linear (attention + MLP) module name per family; the unembedding is never a target.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
ALL_LINEAR = "all-linear"
PEFT_DEFAULT = "peft-default"
#: the named rules ``--lora-targets`` accepts instead of module names.
LORA_TARGET_RULES = (ALL_LINEAR, PEFT_DEFAULT)


def default_targets(family: str) -> list[str]:
    return list(LORA_TARGETS[family])


def check_rule(targets: list[str] | None) -> None:
    """A rule stands alone: ``UserError`` for ``all-linear,q_proj`` and the like (torch-free)."""
    if targets and len(targets) > 1 and set(targets) & set(LORA_TARGET_RULES):
        raise UserError(f"--lora-targets: {' or '.join(LORA_TARGET_RULES)} stands alone, got {','.join(targets)}")


def rule_of(targets: list[str] | None) -> str:
    """The rule that ``targets`` names: ``all-linear``, ``peft-default`` or ``names``."""
    if not targets or targets == [ALL_LINEAR]:
        return ALL_LINEAR
    return targets[0] if targets[0] in LORA_TARGET_RULES else "names"


def peft_default_targets(model_type: str, family: str) -> list[str]:
    """PEFT's default target modules for ``model_type``; every linear of ``family`` where PEFT has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    default = PEFT_DEFAULTS.get(model_type)
    return list(default) if default else default_targets(family)


def resolve_targets(model, family: str, targets: list[str] | None) -> list[str]:
    """The module names to adapt: the rule's (see the module docstring) or the names given,
    checked against ``model``; ``UserError`` if a name matches no module."""
    check_rule(targets)
    rule = rule_of(targets)
    if rule == ALL_LINEAR:
        targets = default_targets(family)
    elif rule == PEFT_DEFAULT:
        targets = peft_default_targets(str(getattr(model.config, "model_type", "")), family)
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in module_names]
    if missing:
        raise UserError(
            f"--lora-targets {','.join(missing)} match no module of this {family} model; "
            f"its linear layers are {','.join(default_targets(family))}"
        )
    return list(targets)


def wrap_lora(model, family: str, *, r: int, alpha: float, targets: list[str] | None = None,
              dropout: float = 0.0):
    """Return a PEFT model whose only trainable parameters are the LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, family, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        bias="none", fan_in_fan_out=(family == "gpt2"), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge(peft_model):
    """Fold the adapters into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()
