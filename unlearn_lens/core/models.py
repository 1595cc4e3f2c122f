"""The one model-spec resolver: a hub id, a local HF directory or a GGUF file (no download here).

Every command takes a *model spec* string. Both the model side (``unlearn_lens.loading``) and the
torch-free checkpoint reader (``analyses.weights.checkpoints``) classify it here, so they agree on what
counts as a path: a path that does not exist is an error, never a hub lookup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unlearn_lens.core.errors import UserError

SourceKind = Literal["hf_dir", "gguf", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: what kind of source it is and where it lives."""

    spec: str
    kind: SourceKind
    path: Path | None = None  # directory (hf_dir) or file (gguf)

    @property
    def gguf_dir_and_file(self) -> tuple[str, str]:
        assert self.kind == "gguf" and self.path is not None
        return str(self.path.parent), self.path.name


def looks_like_path(spec: str) -> bool:
    """True for a spec that can only be a local path.

    ``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.gguf``, and ``a\\b`` where the separator is a backslash (Windows).
    """
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(".gguf")
        or spec.count("/") > 1
        or os.sep == "\\" and "\\" in spec
    )


def resolve_source(spec: str) -> ModelSource:
    """Classify a model spec; a path that does not exist is an error, not a hub lookup."""
    if not spec or not str(spec).strip():
        raise UserError("empty model spec: give a hub id, a local model directory or a .gguf file")
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise UserError(f"{spec}: a model file must be a .gguf file (or give a model directory)")
            return ModelSource(spec, "gguf", path.resolve())
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, "gguf", ggufs[0].resolve())
            raise UserError(f"{spec}: not a model directory (no config.json)")
        return ModelSource(spec, "hf_dir", path.resolve())
    if looks_like_path(spec):
        raise UserError(f"{spec}: no such model file or directory")
    return ModelSource(spec, "hub")
