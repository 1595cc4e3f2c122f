"""docs/notebooks/explore-cache.ipynb runs (nbclient, kernel ``python3``) on tiny-model caches and
draws its figures; the committed notebook carries no outputs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "notebooks" / "explore-cache.ipynb"


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_committed_notebook_is_clean_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert all(cell.outputs == [] and cell.execution_count is None for cell in cells)
    first = cells[0]
    assert first.metadata.get("tags") == ["parameters"]
    for name, default in (("ULENS_BASE_CACHE", "outputs/demo/caches/smollm2.zarr"),
                          ("ULENS_MODIFIED_CACHE", "outputs/demo/caches/rmu.zarr")):
        assert f'os.environ.get("{name}", demo_output("{default}"))' in first.source
    assert "torch" not in "".join(cell.source for cell in cells)


@pytest.mark.slow
def test_notebook_runs_on_tiny_caches(tiny_cache_pair, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    from unlearn_lens.data import read_texts

    sample = 3
    monkeypatch.setenv("ULENS_BASE_CACHE", str(tiny_cache_pair["caches"]["base"]))
    monkeypatch.setenv("ULENS_MODIFIED_CACHE", str(tiny_cache_pair["caches"]["modified"]))
    monkeypatch.setenv("ULENS_SAMPLE", str(sample))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in code_cells(nb) for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [cell for cell in code_cells(nb) if "figure" in cell.metadata.get("tags", [])]
    assert len(figures) == 3
    for cell in figures:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:80]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")

    # the sample's text, decoded through the tiny tokenizer found from the cache's provenance
    assert f"text: {read_texts(tiny_cache_pair['data'], 'forget')[sample]!r}" in text
    # block 1's MLP was scaled: layers 0 and 1 (embedding, block 0) are untouched, later ones move
    table = re.findall(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", text, flags=re.M)
    assert [int(row[0]) for row in table] == [0, 1, 2, 3]
    for layer, *changes in table:
        assert all((float(c) == 0.0) == (int(layer) <= 1) for c in changes), (layer, changes)
    assert "letter scoring only" not in text  # the cloze lens read the tiny checkpoints' unembedding
