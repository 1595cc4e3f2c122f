"""Column-space selectivity for updates of the matrices that write into the residual stream.

Planted: a rank-1 update u v^T of one block's MLP down-projection (what RMU changes). Its row space
lives in the MLP hidden width, which the cache does not hold; its column direction u lives in the
residual stream. Forget activations carry u in the residual the block writes into, retain ones do
not: the column-space rows find u and give a high forget/retain selectivity, and the report's
cell gets a value although no reading matrix changed.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from analyses.activations import row_space
from analyses.activations.runner import AnalyzeOptions, run_analysis
from analyses.report import ReportInputs, signature_table
from analyses.testing import llama_tensors, make_cache, random_lengths, write_checkpoint
from analyses.weights.checkpoints import open_checkpoint

LAYERS, HIDDEN, FF, VOCAB, BLOCK = 3, 8, 16, 40, 1
DOWN = f"model.layers.{BLOCK}.mlp.down_proj.weight"


def _planted(tmp_path):
    rng = np.random.default_rng(0)
    u = rng.normal(size=HIDDEN)
    u /= np.linalg.norm(u)
    base = llama_tensors(LAYERS, HIDDEN, FF, VOCAB, seed=1)
    for layer in range(LAYERS):  # an unchanged attention output, stacked beside the down-projection
        base[f"model.layers.{layer}.self_attn.o_proj.weight"] = rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32)
    modified = {k: v.copy() for k, v in base.items()}
    modified[DOWN] += np.outer(u, rng.normal(size=FF)).astype(np.float32)  # (out = hidden, in = ff)
    return u, write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "rmu", modified)


def test_column_bases_find_the_written_direction(tmp_path):
    u, base, modified = _planted(tmp_path)
    a, b = open_checkpoint(base), open_checkpoint(modified)
    columns = row_space.column_bases(a, b, top_k=4)
    assert sorted(columns) == [BLOCK]  # unchanged blocks get no column-space row
    basis, rank, names = columns[BLOCK]
    assert rank == 1 and basis.shape == (HIDDEN, 1)
    assert names == [f"model.layers.{BLOCK}.mlp.down_proj.weight", f"model.layers.{BLOCK}.self_attn.o_proj.weight"]
    assert abs(float(basis[:, 0] @ u)) == pytest.approx(1.0, abs=1e-6)
    # the row-space side sees nothing: no MLP input matrix changed
    assert all(rank == 0 for _, rank, _ in row_space.update_bases(a, b, top_k=4).values())


def test_planted_down_projection_gets_a_selectivity(tmp_path):
    u, base, modified = _planted(tmp_path)
    caches, raw = {"base": {}, "rmu": {}}, {}
    for s, split in enumerate(("forget", "retain")):
        lengths = random_lengths(14, np.random.default_rng(10 + s))
        n = int(lengths.sum())
        ids = np.random.default_rng(20 + s).integers(0, VOCAB, size=n)
        resid = np.random.default_rng(30 + s).normal(size=(LAYERS + 1, n, HIDDEN))
        if split == "forget":  # forget tokens carry u, strongly, in the residual block BLOCK writes into
            resid[BLOCK + 1] += 6.0 * np.random.default_rng(5).normal(size=(n, 1)) * u
        mlp = np.random.default_rng(40 + s).normal(size=(LAYERS, n, HIDDEN))
        for model, path in (("base", base), ("rmu", modified)):
            raw[(model, split)] = resid.astype(np.float32)
            caches[model][split] = make_cache(resid.astype(np.float32), lengths, split=split,
                                              mlp_in=mlp.astype(np.float32), input_ids=ids, token_chunk=16,
                                              attrs={"model_path": path})
    out = tmp_path / "out"
    run_analysis(caches, "base", out, AnalyzeOptions(progress=False, top_k=4))
    folder = out / "base__to__rmu" / "row_space_projection"
    with open(folder / "row_space_projection.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == row_space.COLUMNS
    row_rows = [r for r in rows if r["space"] == "row"]
    assert len(row_rows) == 2 * LAYERS and all(r["k"] == "0" for r in row_rows)
    column = [r for r in rows if r["space"] == "column"]
    assert {(int(r["mlp_layer"]), r["activations"]) for r in column} == {(BLOCK, "base"), (BLOCK, "rmu")}
    for r in column:
        assert r["projected"] == f"resid[{BLOCK + 1}]" and r["k"] == "1"
        x = raw[("base", "forget")][BLOCK + 1].astype(np.float64)
        assert float(r["share_forget"]) == pytest.approx(((x @ u) ** 2).sum() / (x ** 2).sum(), rel=1e-4)
        assert float(r["selectivity_ratio"]) > 4  # about (36 + 1) / (36 + 8) against 1 / 8
        assert float(r["random_selectivity_ratio"]) < 2
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["mean_selectivity_ratio"]["base"] > 4
    assert summary["mean_selectivity_ratio_by_space"]["base"]["row"] is None
    assert (folder / "column_space_projection.png").is_file()
    cells = {r["metric"]: r["rmu"] for r in signature_table(ReportInputs(out, "base", ["rmu"]))}
    cell = cells["row/column-space selectivity (forget/retain energy where ΔW reads or writes)"]
    assert cell != "—" and float(cell) > 4
