"""Named published configurations of the unlearning methods (``unlearn --preset NAME``).

A ``Preset`` maps ``UnlearnConfig`` field names to values; a key ending in ``_at_32`` holds
layer indices given for a 32-layer model, resolved with ``scale_layers`` into the field without
the suffix once the model's depth is known. ``PRESETS[method][name]`` merges the submodules'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One named configuration of one method: ``values`` (config field -> value) and its ``source``."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def scale_layers(layers, n_layers: int, reference_depth: int = 32) -> list[int]:
    """Layer indices given at ``reference_depth`` layers, scaled by depth to ``n_layers``
    (rounded, clamped to the model's blocks)."""
    return [min(n_layers - 1, max(0, int(round(layer * n_layers / reference_depth)))) for layer in layers]


def _merge(*modules) -> dict[str, dict[str, Preset]]:
    merged: dict[str, dict[str, Preset]] = {}
    for module in modules:
        for method, presets in module.PRESETS.items():
            merged.setdefault(method, {}).update(presets)
    return merged


from unlearn_lens.unlearning.presets import adversarial  # noqa: E402

PRESETS: dict[str, dict[str, Preset]] = _merge(adversarial)
