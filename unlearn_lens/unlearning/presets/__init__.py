"""Named hyper-parameter presets per method: ``default`` (this tool's defaults), ``original`` (what
``unlearn`` did before presets) and ``reference`` (a published configuration, cited in ``Preset.source``).

``default`` and ``original`` differ only where issue #14 fixed a method itself: cb_lat's adversary
sits upstream of the scored layers by default, while ``original`` keeps the original pipeline's
placement on the scored layer (for comparison with runs made before the fix).

``resolve(method, preset, explicit)`` gives the ``UnlearnConfig`` values of a run: the preset's,
then the flags the user gave explicitly on top. Layer indices of a preset refer to a 32-layer
model when the preset lists them in ``depth_scaled``; ``UnlearnConfig.resolve_layers`` maps them
to the model's depth with ``scale_layers`` once the model is loaded. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unlearn_lens.core.errors import UserError

DEFAULT_PRESET = "default"
_DEFAULT_SOURCE = ("this tool's defaults (unlearn --help): the original pipeline's settings, with cb_lat's "
                   "adversary upstream of the scored layers")
#: depth of the models the published layer choices were made on (Zephyr-7B, Llama-3-8B: 32 layers).
REFERENCE_DEPTH = 32
#: flags that exclude each other: a preset's value yields to the user's other one.
_EXCLUSIVE = (("steps", "epochs"), ("warmup_steps", "warmup_epochs"))
#: (preset field, flag): the preset's value yields when the flag is given, whose default derives it
#: (rmu trains layers layer_id-2..layer_id of the layer the user names).
_DERIVED = (("update_layers", "layer_id"), ("target_layers", "layer_id"))


@dataclass(frozen=True)
class Preset:
    """One named configuration: UnlearnConfig field -> value, and where the values come from."""

    name: str
    values: dict[str, Any]
    source: str
    #: fields of ``values`` holding layer indices of a ``REFERENCE_DEPTH``-layer model (scaled to the model).
    depth_scaled: tuple[str, ...] = field(default=())


def scale_layers(layers: list[int], n_layers: int, reference_depth: int = REFERENCE_DEPTH) -> list[int]:
    """Map layer indices chosen on a ``reference_depth``-layer model to an ``n_layers`` model:
    ``round(L * n_layers / reference_depth)``, clipped to the model, duplicates dropped (order kept)."""
    out: list[int] = []
    for layer in layers:
        scaled = min(n_layers - 1, max(0, round(layer * n_layers / reference_depth)))
        if scaled not in out:
            out.append(scaled)
    return out


def _registry() -> dict[str, dict[str, Preset]]:
    from unlearn_lens.unlearning.presets import adversarial, gradient, representation, weights

    from unlearn_lens.unlearning.method_names import METHODS

    merged: dict[str, dict[str, Preset]] = {method: {DEFAULT_PRESET: Preset(DEFAULT_PRESET, {}, _DEFAULT_SOURCE)}
                                            for method in METHODS}
    for module in (gradient, representation, weights, adversarial):
        for method, presets in module.PRESETS.items():
            merged.setdefault(method, {}).update(presets)
    return merged


def preset_names(method: str) -> list[str]:
    return list(PRESETS.get(method, {}))


def get(method: str, preset: str) -> Preset:
    """The preset ``preset`` of ``method``; ``UserError`` naming the valid ones otherwise."""
    available = PRESETS.get(method, {})
    if preset not in available:
        raise UserError(f"unknown --preset {preset!r} for {method}; choose one of {', '.join(available) or 'none'}")
    return available[preset]


def resolve(method: str, preset: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The preset's values with the explicitly given flags on top (they always win).

    Also returns ``depth_scaled``: the preset's layer fields the user did not override.
    """
    chosen = get(method, preset)
    values = dict(chosen.values)
    for pair in _EXCLUSIVE:
        for mine, other in (pair, pair[::-1]):
            if other in explicit and explicit[other] is not None:
                values.pop(mine, None)
    for derived, flag in _DERIVED:
        if flag in explicit and derived not in explicit:
            values.pop(derived, None)
    values.update(explicit)
    values["depth_scaled"] = [f for f in chosen.depth_scaled if f in values and f not in explicit]
    return values


def describe() -> str:
    """One line per method and preset (what it sets, its source), for ``unlearn --help``."""
    lines = []
    for method, presets in PRESETS.items():
        for name, preset in presets.items():
            sets = ", ".join(f"{k}={v}" for k, v in preset.values.items()) or "the defaults"
            scaled = f" (layers at {REFERENCE_DEPTH} layers, scaled by depth)" if preset.depth_scaled else ""
            lines.append(f"{method} {name}: {sets}{scaled}. Source: {preset.source}")
    return "\n".join(lines)


PRESETS: dict[str, dict[str, Preset]] = _registry()
