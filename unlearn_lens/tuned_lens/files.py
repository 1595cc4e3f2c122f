"""The files of ``<model>/wmdp_tuned_lens/`` that need more than a CSV or JSON writer.

The translators as safetensors (written atomically, read back with numpy only, as ``analyses``
does), the results CSV's columns and the accuracy-by-layer figure (``OUTPUTS.md`` lists them all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from unlearn_lens.core.atomic import atomic_path
from unlearn_lens.tuned_lens.scoring import SCORINGS

CSV_COLUMNS = ("layer", "scoring", "accuracy", "delta_from_final", "n_questions")


def write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Numpy arrays and string metadata as one safetensors file, written atomically."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(arrays, tmp, metadata=metadata)


def load_translators(path: str | Path) -> dict[str, np.ndarray]:
    """``weight`` (L+1, d, d) and ``bias`` (L+1, d) from a ``translators.safetensors`` (numpy only)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def plot_accuracies(rows: Sequence[dict], title: str, path) -> None:
    """Accuracy per layer, one line per scoring, with the 0.25 chance line."""
    from analyses.io import atomic_save_figure
    from analyses.plotting import subplots

    figure, ax = subplots(figsize=(8, 4.5))
    for scoring in SCORINGS:
        part = [r for r in rows if r["scoring"] == scoring]
        if part:
            ax.plot([r["layer"] for r in part], [r["accuracy"] for r in part], marker="o", label=scoring)
    ax.axhline(0.25, color="gray", linestyle="--", label="chance (0.25)")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("WMDP multiple-choice accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    atomic_save_figure(figure, path)
