"""Presets of cb, cb_lat and lat (placeholder: ``original`` only; replaced by the adversarial work)."""

from __future__ import annotations

from unlearn_lens.unlearning.presets import Preset

_ORIGINAL = "this tool's defaults (the original pipeline's settings)"

PRESETS: dict[str, dict[str, Preset]] = {
    method: {"original": Preset("original", {}, _ORIGINAL)} for method in ("cb", "cb_lat", "lat")
}
