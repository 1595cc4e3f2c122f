"""LoRA wrapping with every linear layer of the family named explicitly.

PEFT's own default for GPT-NeoX adapts only ``query_key_value``, which would make any LoRA edit
look attention-localised; here every attention and MLP matrix is a target unless
``--lora-targets`` says otherwise. GPT-2 stores its linears as ``Conv1D`` (in, out), which
needs ``fan_in_fan_out=True``.
"""

from __future__ import annotations

from unlearn_lens.core.errors import UserError

#: every linear (attention + MLP) module name per family; the unembedding is never a target.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def default_targets(family: str) -> list[str]:
    return list(LORA_TARGETS[family])


def check_targets(model, family: str, targets: list[str] | None) -> list[str]:
    """The target module names to use; ``UserError`` if one names no module of ``model``."""
    targets = targets or default_targets(family)
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in module_names]
    if missing:
        raise UserError(
            f"--lora-targets {','.join(missing)} match no module of this {family} model; "
            f"its linear layers are {','.join(default_targets(family))}"
        )
    return targets


def wrap_lora(model, family: str, *, r: int, alpha: float, targets: list[str] | None = None,
              dropout: float = 0.0):
    """Return a PEFT model whose only trainable parameters are the LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    targets = check_targets(model, family, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        bias="none", fan_in_fan_out=(family == "gpt2"), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge(peft_model):
    """Fold the adapters into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()
