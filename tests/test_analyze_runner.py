"""``run_analysis`` on synthetic caches: outputs equal direct computations, chunks read once,
refusals, schedulers (threads, a process LocalCluster) agree, and no torch is ever imported."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from analyses.activations.runner import AnalyzeOptions, run_analysis
from analyses.testing import llama_tensors, make_cache, make_wmdp_pair, random_lengths, write_checkpoint
from unlearn_lens.core.errors import UserError

LAYERS, HIDDEN, FF, VOCAB = 3, 8, 16, 40
OPTIONS = AnalyzeOptions(progress=False, top_k=4)


def build(tmp_path: Path, *, n_samples=12, token_chunk=16, wrap=None, compare_seed=1):
    """Two models' caches (base, unl) over identical tokens, with their checkpoints on disk."""
    rng = np.random.default_rng(0)
    base_tensors = llama_tensors(LAYERS, HIDDEN, FF, VOCAB, seed=1)
    unl_tensors = {k: v.copy() for k, v in base_tensors.items()}
    unl_tensors["model.layers.1.mlp.up_proj.weight"] += np.outer(rng.normal(size=FF), rng.normal(size=HIDDEN)).astype(np.float32)
    paths = {"base": write_checkpoint(tmp_path / "ckpt_base", base_tensors),
             "unl": write_checkpoint(tmp_path / "ckpt_unl", unl_tensors)}
    raw = {}
    caches = {"base": {}, "unl": {}}
    for s, split in enumerate(("forget", "retain")):
        lengths = random_lengths(n_samples, np.random.default_rng(10 + s))
        ids = np.random.default_rng(20 + s).integers(0, VOCAB, size=lengths.sum())
        resid = np.random.default_rng(30 + s).normal(size=(LAYERS + 1, lengths.sum(), HIDDEN))
        if split == "forget":
            resid[2:] += 3.0  # planted separation from layer 2 on
        mlp = np.random.default_rng(40 + s).normal(size=(LAYERS, lengths.sum(), HIDDEN))
        for model, seed in (("base", 0), ("unl", compare_seed)):
            noise = np.random.default_rng(100 * seed + s)
            r = resid + (0.2 * noise.normal(size=resid.shape) if seed else 0)
            m = mlp + (0.2 * noise.normal(size=mlp.shape) if seed else 0)
            raw[(model, split)] = (r.astype(np.float32), m.astype(np.float32), lengths)
            caches[model][split] = make_cache(r, lengths, split=split, mlp_in=m, input_ids=ids,
                                              token_chunk=token_chunk, attrs={"model_path": paths[model]})
    for model in ("base", "unl"):
        wmdp, cloze, _ = make_wmdp_pair(5, num_layers=LAYERS, hidden=HIDDEN, vocab=VOCAB, seed=3,
                                        unembedding=(base_tensors if model == "base" else unl_tensors)["lm_head.weight"],
                                        attrs={"model_path": paths[model]})
        caches[model]["wmdp"], caches[model]["wmdp_cloze"] = wmdp, cloze
    if wrap is not None:
        caches = {m: {s: wrap(ds) for s, ds in splits.items()} for m, splits in caches.items()}
    return caches, raw, paths


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


FOLDERS = ["base__to__unl/activation_stats", "base__to__unl/activation_plots", "base__to__unl/activation_separation",
           "base__to__unl/activation_covariance", "base__to__unl/row_space_projection", "base/linear_probes",
           "unl/linear_probes", "base/wmdp_logit_lens", "unl/wmdp_logit_lens"]


def test_outputs_equal_direct_computations(tmp_path):
    caches, raw, paths = build(tmp_path)
    run_analysis(caches, "base", tmp_path / "out", OPTIONS)
    out = tmp_path / "out"
    for folder in FOLDERS:
        assert (out / folder / "_COMPLETE").is_file(), folder
    assert len(list((out / "base__to__unl/activation_plots").glob("*.png"))) == 2

    stats = read_csv(out / "base__to__unl/activation_stats/activation_stats.csv")
    assert list(stats[0]) == ["layer", "split", "model_a_norm_L1", "model_a_norm_L2", "model_b_norm_L1",
                              "model_b_norm_L2", "mean_dh_L1", "mean_dh_L2"]
    assert len(stats) == 2 * (LAYERS + 1)
    a, _, _ = raw[("base", "retain")]
    b, _, _ = raw[("unl", "retain")]
    row = next(r for r in stats if r["split"] == "retain" and r["layer"] == "2")
    # tolerance: F32-ORDER (the float32 cache reduced by dask in chunks vs numpy in one pass)
    assert float(row["model_a_norm_L2"]) == pytest.approx(np.linalg.norm(a[2], axis=1).mean(), rel=1e-6)
    assert float(row["mean_dh_L1"]) == pytest.approx(np.abs(b[2] - a[2]).sum(1).mean(), rel=1e-5)

    cov = read_csv(out / "base__to__unl/activation_covariance/covariance_metrics.csv")
    eig = np.clip(np.linalg.eigvalsh(np.cov(a[1].T.astype(np.float64), bias=True)), 0, None)
    p = eig / eig.sum()
    row = next(r for r in cov if r["split"] == "retain" and r["layer"] == "1")
    assert float(row["model_a_effective_rank"]) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    selectivity = read_csv(out / "base__to__unl/activation_covariance/covariance_selectivity.csv")
    assert len(selectivity) == LAYERS + 1

    separation = read_csv(out / "base__to__unl/activation_separation/separation_metrics.csv")
    base_rows = {int(r["layer"]): r for r in separation if r["model"] == "base"}
    assert float(base_rows[3]["auc"]) == pytest.approx(1.0)
    assert float(base_rows[3]["variance_ratio"]) > 10 * float(base_rows[0]["variance_ratio"])
    f, _, _ = raw[("base", "forget")]
    cf, cr = f[0].mean(0, dtype=np.float64), a[0].mean(0, dtype=np.float64)
    assert float(base_rows[0]["cosine_distance"]) == pytest.approx(
        1 - cf @ cr / np.linalg.norm(cf) / np.linalg.norm(cr), rel=1e-5)

    rows = read_csv(out / "base__to__unl/row_space_projection/row_space_projection.csv")
    assert {(r["mlp_layer"], r["activations"]) for r in rows} == {(str(l), m) for l in range(LAYERS) for m in ("base", "unl")}
    changed = next(r for r in rows if r["mlp_layer"] == "1" and r["activations"] == "unl")
    assert changed["k"] == "1" and changed["dW_rank"] == "1"
    from analyses.weights.checkpoints import open_checkpoint

    dW = (open_checkpoint(paths["unl"]).read_matrix("model.layers.1.mlp.up_proj.weight")
          - open_checkpoint(paths["base"]).read_matrix("model.layers.1.mlp.up_proj.weight")).astype(np.float64)
    v = np.linalg.svd(dW)[2][0]
    _, mlp_f, _ = raw[("unl", "forget")]
    x = mlp_f[1].astype(np.float64)
    assert float(changed["share_forget"]) == pytest.approx(((x @ v) ** 2).sum() / (x ** 2).sum(), rel=1e-5)
    untouched = next(r for r in rows if r["mlp_layer"] == "0" and r["activations"] == "base")
    assert untouched["k"] == "0"

    probe = read_csv(out / "base/linear_probes/probe_results.csv")
    assert len(probe) == LAYERS + 1 and float(probe[3]["accuracy"]) == 1.0
    lens = read_csv(out / "unl/wmdp_logit_lens/wmdp_lens_results.csv")
    assert list(lens[0]) == ["layer", "scoring", "accuracy", "delta_from_final", "n_questions"]
    assert {r["scoring"] for r in lens} == {"letter", "cloze"} and len(lens) == 2 * (LAYERS + 1)
    summary = json.loads((out / "unl/wmdp_logit_lens/summary.json").read_text())
    assert summary["letter"]["final_layer_agreement_with_model"] == 1.0
    assert summary["cloze"]["final_layer_agreement_with_model"] == 1.0
    assert summary["cloze"]["final_layer_max_abs_logprob_difference"] < 1e-4


class CountingArray:
    """A numpy array whose reads are counted per requested block (to prove chunks are read once)."""

    def __init__(self, array, counter, label):
        self.array, self.counter, self.label = array, counter, label
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        out = self.array[key]
        if out.size:  # dask probes metadata with empty slices; those read nothing
            with LOCK:
                self.counter[(self.label, repr(key))] += 1
        return out


LOCK = threading.Lock()


def test_each_chunk_read_once(tmp_path):
    counter: Counter = Counter()

    def wrap(ds):
        ds = ds.copy()
        for name in ("resid", "mlp_in"):
            var = ds[name]
            label = f"{ds.attrs['model_path']}:{ds.attrs['split']}:{name}"
            counting = CountingArray(var.values, counter, label)
            ds[name] = (var.dims, da.from_array(counting, chunks=var.data.chunks, asarray=True, name=label))
        return ds

    caches, _, _ = build(tmp_path, wrap=wrap)
    run_analysis(caches, "base", tmp_path / "out", OPTIONS)
    token_reads = {key: n for key, n in counter.items() if ":wmdp" not in key[0]}
    assert token_reads, "the counting arrays were never read"
    expected_blocks = sum(len(caches[m][s][v].data.chunks[1]) for m in ("base", "unl")
                          for s in ("forget", "retain") for v in ("resid", "mlp_in"))
    assert len(token_reads) == expected_blocks
    assert max(token_reads.values()) == 1, [k for k, n in token_reads.items() if n > 1][:3]


def test_max_samples_equals_sliced_caches(tmp_path):
    caches, _, _ = build(tmp_path)
    run_analysis(caches, "base", tmp_path / "a", AnalyzeOptions(progress=False, top_k=4, max_samples=5))
    small = {m: {s: (ds.isel(sample=slice(0, 5), token=slice(0, int(ds.sample_length.values[:5].sum())))
                     if s in ("forget", "retain") else ds) for s, ds in splits.items()}
             for m, splits in caches.items()}
    run_analysis(small, "base", tmp_path / "b", AnalyzeOptions(progress=False, top_k=4, max_samples=None))
    for name in ("base__to__unl/activation_stats/activation_stats.csv", "base/linear_probes/probe_results.csv"):
        assert read_csv(tmp_path / "a" / name) == read_csv(tmp_path / "b" / name)
    assert read_csv(tmp_path / "a/base/linear_probes/probe_results.csv")[0]["n_forget"] == "5"
    assert read_csv(tmp_path / "a/base/wmdp_logit_lens/wmdp_lens_results.csv")[0]["n_questions"] == "5"


def test_refusals(tmp_path):
    caches, _, paths = build(tmp_path)
    incomplete = {**caches, "unl": {**caches["unl"], "forget": caches["unl"]["forget"].assign_attrs(complete=False)}}
    with pytest.raises(UserError, match="incomplete"):
        run_analysis(incomplete, "base", tmp_path / "o", OPTIONS)
    other_ids = caches["unl"]["retain"].copy()
    other_ids["input_ids"] = other_ids["input_ids"] + 1
    with pytest.raises(UserError, match="different data or tokenisation"):
        run_analysis({**caches, "unl": {**caches["unl"], "retain": other_ids}}, "base", tmp_path / "o", OPTIONS)
    with pytest.raises(UserError, match="no 'retain' split"):
        run_analysis({**caches, "unl": {"forget": caches["unl"]["forget"]}}, "base", tmp_path / "o", OPTIONS)
    with pytest.raises(UserError, match="nothing to compare"):
        run_analysis({"base": caches["base"]}, "base", tmp_path / "o", OPTIONS)
    wide = write_checkpoint(tmp_path / "wide", llama_tensors(LAYERS, HIDDEN, FF * 2, VOCAB))
    from analyses.weights.checkpoints import open_checkpoint

    with pytest.raises(UserError, match="has shape"):
        run_analysis(caches, "base", tmp_path / "o", OPTIONS, checkpoints={"unl": open_checkpoint(wide)})
    assert not (tmp_path / "o").exists()  # refused before writing anything


def test_local_cluster_matches_threads(tmp_path):
    from distributed import Client, LocalCluster

    caches, _, _ = build(tmp_path)
    run_analysis(caches, "base", tmp_path / "threads", OPTIONS)
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster):
        run_analysis(caches, "base", tmp_path / "cluster", OPTIONS)
    for csv_path in sorted((tmp_path / "threads").rglob("*.csv")):
        other = tmp_path / "cluster" / csv_path.relative_to(tmp_path / "threads")
        assert csv_path.read_text() == other.read_text(), csv_path


def test_fits_in_worker_processes_equal_in_process(monkeypatch):
    from analyses.activations import execution, probes, separation

    rng = np.random.default_rng(3)
    forget = rng.normal(0.3, 1.0, size=(4, 20, 6)).astype(np.float32)
    retain = rng.normal(0.0, 1.0, size=(4, 20, 6)).astype(np.float32)
    expected = (probes.probe_rows(forget, retain, seed=2), separation.layer_aucs(forget, retain, seed=2))
    monkeypatch.setattr(execution, "PROCESS_POOL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(execution, "_local_workers", lambda: 2)
    assert execution._process_pool(1) is not None  # the pool path, not the in-process fallback
    got = (probes.probe_rows(forget, retain, seed=2, map_layers=execution.map_processes),
           separation.layer_aucs(forget, retain, seed=2, map_layers=execution.map_processes))
    assert got == expected
    with pytest.raises(UserError, match="at least 2 forget"):  # a worker's refusal stays a one-line error
        probes.probe_rows(forget[:, :1], retain, map_layers=execution.map_processes)


def test_run_with_fits_in_worker_processes_writes_the_same(tmp_path, monkeypatch):
    from analyses.activations import execution

    caches, _, _ = build(tmp_path)
    run_analysis(caches, "base", tmp_path / "in_process", OPTIONS)
    monkeypatch.setattr(execution, "PROCESS_POOL_MIN_ELEMENTS", 0)  # warm-up thread and pool, however small
    monkeypatch.setattr(execution, "_local_workers", lambda: 2)
    run_analysis(caches, "base", tmp_path / "pool", OPTIONS)
    assert not [t for t in threading.enumerate() if t.name == "process-pool-warm-up"]
    for csv_path in sorted((tmp_path / "in_process").rglob("*.csv")):
        assert csv_path.read_text() == (tmp_path / "pool" / csv_path.relative_to(tmp_path / "in_process")).read_text()


BLOCKER = textwrap.dedent('''
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "nnsight"):
                raise ImportError(f"{name} is blocked: analyses must not import it")
            return None
    sys.meta_path.insert(0, _Block())
''')


def blocked_env(tmp_path: Path) -> dict:
    """Environment whose sitecustomize makes importing torch/transformers/nnsight fail."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def test_runs_with_torch_blocked(tmp_path):
    script = textwrap.dedent(f'''
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not work")
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_analyze_runner import build, OPTIONS
        from analyses.activations.runner import run_analysis
        caches, _, _ = build(Path({str(tmp_path)!r}))
        run_analysis(caches, "base", Path({str(tmp_path / "out")!r}), OPTIONS)
        bad = [m for m in ("torch", "transformers", "nnsight") if m in sys.modules]
        assert not bad, bad
        print("OK")
    ''')
    result = subprocess.run([sys.executable, "-c", script], env=blocked_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
    assert (tmp_path / "out/base/wmdp_logit_lens/_COMPLETE").is_file()
