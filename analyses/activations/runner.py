"""Run every cache-based activation diagnostic for a base model and its modified variants.

Input: lazy cache Datasets (``cache_store/SCHEMA.md``) per model and split, plus each model's
checkpoint (read tensor by tensor for the MLP input-side updates and the unembedding). No model is
run. Per split, every token-level reduction of every model (norms, difference norms, centroids,
second moments of the residual stream and of the MLP inputs) and every last-token array are built
lazily and evaluated in ONE ``dask.compute``, so each cached chunk is read once; the d x d
matrices are reduced to spectra and row-space shares straight away and then dropped.

Outputs: per comparison ``OUT/<base>__to__<name>/{activation_stats, activation_plots,
activation_separation, activation_covariance, row_space_projection}/`` and per model
``OUT/<model>/{linear_probes, wmdp_logit_lens}/``; CSVs written atomically, each folder's
completion marker last.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import dask
import dask.array as da
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from analyses.activations import covariance, logit_lens, norms, probes, row_space, separation
from analyses.io import atomic_write_csv, atomic_write_json, clear_complete, mark_complete
from analyses.plotting import by, panel_plot, spectra_plot
from analyses.activations.reductions import Moments, difference_norms, projected_energy, token_moments
from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.outputs import comparison_name

SPLITS = ("forget", "retain")
LENS_SPLITS = ("wmdp", "wmdp_cloze")

#: caches[model][split] -> lazy Dataset following SCHEMA.md
Caches = Mapping[str, Mapping[str, xr.Dataset]]


@dataclass
class AnalyzeOptions:
    """Knobs of ``unlearn-lens analyze`` (see the command's --help)."""

    max_samples: int | None = None
    C: float = 1.0
    max_iter: int = 1000
    top_k: int = 16
    seed: int = 0
    progress: bool = True


# --- inputs ------------------------------------------------------------------------------------

def subset_samples(ds: xr.Dataset, max_samples: int | None) -> xr.Dataset:
    """The first ``max_samples`` samples of a split (and exactly their tokens)."""
    if max_samples is None or ds.sizes["sample"] <= max_samples:
        return ds
    if max_samples < 1:
        raise UserError("--max-samples must be at least 1")
    last = max_samples - 1
    end = int(ds["sample_offset"][last].values) + int(ds["sample_length"][last].values)
    return ds.isel(sample=slice(0, max_samples), token=slice(0, end))


def same_tokens(a: xr.Dataset, b: xr.Dataset) -> bool:
    """True when two caches of a split hold the same token ids cut into the same samples."""
    if a.sizes.get("token") != b.sizes.get("token") or a.sizes.get("sample") != b.sizes.get("sample"):
        return False
    return (np.array_equal(a["input_ids"].values, b["input_ids"].values)
            and np.array_equal(a["sample_offset"].values, b["sample_offset"].values))


def validate_caches(caches: Caches, base: str) -> None:
    """Refuse incomplete caches, missing splits, other shapes and caches of other data/tokenisation."""
    if base not in caches:
        raise UserError(f"no cache for the base model {base!r}")
    if len(caches) < 2:
        raise UserError("nothing to compare: give at least one --compare NAME=CACHE")
    for model, splits in caches.items():
        for split in SPLITS:
            if split not in splits:
                raise UserError(f"{model}: the cache has no {split!r} split; capture it (--splits forget,retain,wmdp)")
        for split, ds in splits.items():
            if not bool(ds.attrs.get("complete", False)):
                raise UserError(f"{model}: the {split!r} split of the cache is incomplete; rerun its capture to finish it")
    reference = caches[base]["forget"]
    for model, splits in caches.items():
        ds = splits["forget"]
        for key in ("layer", "mlp_layer", "hidden"):
            if ds.sizes.get(key) != reference.sizes.get(key):
                raise UserError(f"{model}: its cache has {ds.sizes.get(key)} {key} entries, {base}'s has "
                                f"{reference.sizes.get(key)}; compare models of the same architecture")
        if model == base:
            continue
        for split in SPLITS + LENS_SPLITS:
            if split in splits and split in caches[base] and not same_tokens(caches[base][split], splits[split]):
                raise UserError(f"{model}: its {split!r} split was captured on different data or tokenisation than "
                                f"{base}'s (input_ids differ); capture every model with the same --data, "
                                "--max-samples and --max-length")


def open_checkpoints(caches: Caches, checkpoints: Mapping[str, Any] | None,
                     opener: Callable[..., Any] | None) -> dict[str, Any]:
    """Each model's checkpoint: given, or opened from the cache's ``model_path`` and ``revision``."""
    opened = dict(checkpoints or {})
    for model, splits in caches.items():
        if model in opened:
            continue
        attrs = splits["forget"].attrs
        path = attrs.get("model_path") or attrs.get("model")
        if not path:
            raise UserError(f"{model}: the cache records no model_path, so its checkpoint cannot be read")
        if opener is None:
            from analyses.weights.checkpoints import open_checkpoint as opener
        opened[model] = opener(str(path), attrs.get("revision") or None)
    return opened


# --- evaluation --------------------------------------------------------------------------------

def _client_active() -> bool:
    if "distributed" not in sys.modules:
        return False
    from distributed import default_client

    try:
        default_client()
    except ValueError:
        return False
    return True


def _as_delayed(objects: Any) -> Any:
    """Wrap dask arrays as Delayed: dask 2026.8 mis-orders results that mix the two kinds."""
    if isinstance(objects, dict):
        return {key: _as_delayed(value) for key, value in objects.items()}
    if isinstance(objects, da.Array):
        return dask.delayed(np.asarray)(objects)
    return objects


def compute(objects: Any, description: str, progress: bool) -> Any:
    """``dask.compute`` on a nested dict of lazy values, with a tqdm bar on local schedulers."""
    objects = _as_delayed(objects)
    if _client_active():
        return dask.compute(objects)[0]
    from threadpoolctl import threadpool_limits
    from tqdm.dask import TqdmCallback

    with threadpool_limits(limits=1, user_api="blas"), TqdmCallback(desc=description, leave=False,
                                                                     disable=not progress):
        return dask.compute(objects)[0]


def _local_workers() -> int:
    return dask.config.get("num_workers", None) or os.cpu_count() or 1


def map_threads(function: Callable, items) -> list:
    """``map`` over in-memory work on local threads, BLAS single-threaded inside (no oversubscription)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=_local_workers()) as pool:
        return list(pool.map(function, items))


#: below this many array elements in all, a process pool's start-up (seconds) outweighs its gain
PROCESS_POOL_MIN_ELEMENTS = 2_000_000


def _process_pool(elements: int):
    """joblib's (reused) loky pool for ``map_processes``, or None where one does not pay: one core,
    or arrays too small."""
    workers = _local_workers()
    if workers == 1 or elements < PROCESS_POOL_MIN_ELEMENTS:
        return None
    from joblib import Parallel

    return Parallel(n_jobs=workers, backend="loky", inner_max_num_threads=1)


def map_processes(function: Callable, *iterables) -> list:
    """``map`` over in-memory tasks whose time is Python, not BLAS (scikit-learn fits: threads would
    queue on the GIL), in local worker processes with one BLAS thread each; in this process when the
    arrays are small. ``function`` and the items travel by pickle: give each task only its slice."""
    tasks = list(zip(*iterables))
    pool = _process_pool(sum(np.size(item) for task in tasks for item in task))
    if pool is None:
        return [function(*task) for task in tasks]
    from joblib import delayed

    return pool(delayed(function)(*task) for task in tasks)


def start_process_pool(elements: int) -> threading.Thread | None:
    """Start ``map_processes``' workers in a background thread (a trivial separation call makes each
    import scikit-learn), so that their start-up overlaps the reductions instead of delaying the
    first fits. Join the thread before the first ``map_processes`` call."""
    pool = _process_pool(elements)
    if pool is None:
        return None
    from joblib import delayed

    zero = np.zeros(1)
    warm_up = [delayed(separation.cosine_distance)(zero, zero)] * _local_workers()

    def start() -> None:
        try:
            pool(warm_up)
        except Exception:  # the fits that follow start the pool again and report what is wrong
            pass

    thread = threading.Thread(target=start, name="process-pool-warm-up", daemon=True)
    thread.start()
    return thread


def split_reductions(caches: Caches, split: str, base: str, tables: Mapping[str, np.ndarray],
                     resid_tables: Mapping[str, np.ndarray] | None = None) -> dict:
    """The lazy reductions of one split for every model (to be evaluated together).

    ``tables[model]`` holds the directions (row spaces of dW and random baselines) that the
    model's MLP inputs are projected on for the row-space diagnostic; ``resid_tables[model]``
    (optional) those its residual stream is projected on (column spaces of the writing updates).
    """
    lazy: dict[str, dict] = {"resid": {}, "mlp": {}, "last": {}, "dh": {}, "resid_proj": {}}
    for model, splits in caches.items():
        ds = splits[split]
        mask = ds["attention_mask"].data
        lazy["resid"][model] = token_moments(ds["resid"].data, mask, finish=covariance.keep_spectra)
        lazy["mlp"][model] = projected_energy(ds["mlp_in"].data, mask, tables[model])
        if resid_tables:
            lazy["resid_proj"][model] = projected_energy(ds["resid"].data, mask, resid_tables[model])
        lazy["last"][model] = ds["last"].data
        if model != base:
            lazy["dh"][model] = difference_norms(caches[base][split]["resid"].data, ds["resid"].data, mask)
    return lazy


# --- writing -----------------------------------------------------------------------------------

def _begin(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    clear_complete(directory)
    return directory


def _finish(directory: Path, info: Mapping[str, Any]) -> None:
    mark_complete(directory, info)


def _write_norms(directory: Path, plots: Path, rows: list[dict], a: str, b: str) -> None:
    atomic_write_csv(_begin(directory) / "activation_stats.csv", rows, norms.COLUMNS)
    _begin(plots)
    panels = []
    for column, label in (("L1", "mean L1 norm"), ("L2", "mean L2 norm")):
        series = {}
        for split in SPLITS:
            series[f"{a} {split}"] = by(rows, "layer", f"model_a_norm_{column}", split=split)
            series[f"{b} {split}"] = by(rows, "layer", f"model_b_norm_{column}", split=split)
        panels.append((label, series, None))
    panel_plot(plots / "activation_norms.png", f"Activation norms per layer: {a} vs {b}", "layer", panels)
    panels = [(f"mean ||dh||_{p[-1]}", {split: by(rows, "layer", f"mean_dh_{p}", split=split) for split in SPLITS},
               None) for p in ("L1", "L2")]
    panel_plot(plots / "activation_diffs.png", f"Activation difference dh = h({b}) - h({a})", "layer", panels)
    _finish(plots, {"files": ["activation_norms.png", "activation_diffs.png"]})
    _finish(directory, {"rows": len(rows), "definition": "per-token means over real tokens, every layer before the final norm"})


def _write_separation(directory: Path, rows: list[dict], a: str, b: str) -> None:
    atomic_write_csv(_begin(directory) / "separation_metrics.csv", rows, separation.COLUMNS)
    panels = [(metric, {m: by(rows, "layer", metric, model=m) for m in (a, b)}, 0.5 if metric == "auc" else None)
              for metric in ("cosine_distance", "auc", "variance_ratio")]
    panel_plot(directory / "separation.png", f"Forget/retain separation: {a} vs {b}", "layer", panels)
    atomic_write_json(directory / "summary.json", {"definitions": separation.DEFINITIONS, "models": [a, b]})
    _finish(directory, {"rows": len(rows)})


def _write_covariance(directory: Path, rows: list[dict], selectivity: list[dict], spectra: dict, a: str,
                      b: str) -> None:
    _begin(directory)
    columns = list(rows[0].keys())
    atomic_write_csv(directory / "covariance_metrics.csv", rows, columns)
    atomic_write_csv(directory / "covariance_selectivity.csv", selectivity, list(selectivity[0].keys()))
    spectra_rows = [{"layer": layer, "split": split, "model": model, "index": i, "eigenvalue": float(value)}
                    for (split, model), values in spectra.items()
                    for layer, layer_values in enumerate(values) for i, value in enumerate(layer_values)]
    atomic_write_csv(directory / "eigenvalues.csv", spectra_rows, ["layer", "split", "model", "index", "eigenvalue"])
    panels = [("effective rank", {f"{m} {s}": by(rows, "layer", f"model_{r}_effective_rank", split=s)
                                  for r, m in (("a", a), ("b", b)) for s in SPLITS}, None),
              ("Wasserstein distance of spectra", {s: by(rows, "layer", "wasserstein", split=s) for s in SPLITS}, None),
              ("selectivity W(forget)/W(retain)", {"raw": by(selectivity, "layer", "selectivity_ratio"),
                                                   "normalised": by(selectivity, "layer",
                                                                    "selectivity_ratio_normalised")}, 1.0)]
    panel_plot(directory / "covariance.png", f"Activation covariance: {a} vs {b}", "layer", panels)
    n_layers = len(spectra[("forget", a)])
    layers = sorted({0, n_layers // 2, n_layers - 1})
    spectra_plot(directory / "spectra_forget.png", f"Covariance spectra on forget text: {a} vs {b}",
                 {a: spectra[("forget", a)], b: spectra[("forget", b)]}, layers)
    atomic_write_json(directory / "summary.json", {"definitions": covariance.DEFINITIONS})
    _finish(directory, {"rows": len(rows)})


def _space_panels(rows: list[dict], models: tuple[str, str], space: str, what: str) -> list:
    """One panel per model: forget / retain / random / chance energy shares of one projection space."""
    panels = []
    for model in models:
        chosen = [r for r in rows if r["activations"] == model and r["space"] == space]
        panels.append((f"energy share ({model} {what})", {
            "forget": by(chosen, "mlp_layer", "share_forget"), "retain": by(chosen, "mlp_layer", "share_retain"),
            "random forget": by(chosen, "mlp_layer", "random_share_forget"),
            "random retain": by(chosen, "mlp_layer", "random_share_retain"),
            "chance k/d": by(chosen, "mlp_layer", "chance_share")}, None))
    return panels


def _write_row_space(directory: Path, rows: list[dict], a: str, b: str, top_k: int, seed: int) -> None:
    atomic_write_csv(_begin(directory) / "row_space_projection.csv", rows, row_space.COLUMNS)
    panel_plot(directory / "row_space_projection.png",
               f"MLP input energy in dW's top-{top_k} row space: {a} -> {b}", "MLP layer",
               _space_panels(rows, (a, b), "row", "MLP inputs"))
    if any(r["space"] == "column" for r in rows):
        panel_plot(directory / "column_space_projection.png",
                   f"Residual energy in the top-{top_k} directions dW writes (attention out, MLP down): {a} -> {b}",
                   "block", _space_panels(rows, (a, b), "column", "residual after the block"))
    atomic_write_json(directory / "summary.json", {
        "definition": row_space.__doc__.strip(), "top_k": top_k, "seed": seed,
        "mean_selectivity_ratio": {m: _nanmean([r["selectivity_ratio"] for r in rows if r["activations"] == m])
                                   for m in (a, b)},
        "mean_selectivity_ratio_by_space": {
            m: {space: _nanmean([r["selectivity_ratio"] for r in rows if r["activations"] == m and r["space"] == space])
                for space in row_space.SPACES} for m in (a, b)}})
    _finish(directory, {"rows": len(rows)})


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _write_probes(directory: Path, rows: list[dict], model: str, options: AnalyzeOptions) -> None:
    atomic_write_csv(_begin(directory) / "probe_results.csv", rows, probes.COLUMNS)
    atomic_write_json(directory / "summary.json", {**probes.summarise(rows), "model": model, "C": options.C,
                                                   "max_iter": options.max_iter, "seed": options.seed})
    panels = [(metric, {model: by(rows, "layer", metric)}, 0.5 if metric == "auc" else None)
              for metric in ("accuracy", "selectivity", "auc")]
    panel_plot(directory / "linear_probes.png", f"Linear probes forget vs retain: {model}", "layer", panels)
    _finish(directory, {"rows": len(rows)})


def _write_lens(directory: Path, rows: list[dict], summary: dict, model: str) -> None:
    atomic_write_csv(_begin(directory) / "wmdp_lens_results.csv", rows, logit_lens.COLUMNS)
    atomic_write_json(directory / "summary.json", {"model": model, **summary})
    series = {scoring: by(rows, "layer", "accuracy", scoring=scoring) for scoring in ("letter", "cloze")}
    panel_plot(directory / "wmdp_logit_lens.png", f"WMDP accuracy by layer (logit lens): {model}", "layer",
               [("accuracy", series, 0.25)])
    _finish(directory, {"rows": len(rows)})


# --- the logit lens ----------------------------------------------------------------------------

def lens_inputs(wmdp: xr.Dataset, cloze: xr.Dataset, max_samples: int | None) -> dict:
    """Small eager metadata plus the lazy arrays the lens needs (gathered continuation states)."""
    n_questions = wmdp.sizes["sample"] if max_samples is None else min(max_samples, wmdp.sizes["sample"])
    question = cloze["question"].values
    samples = np.flatnonzero(question < n_questions)
    token_index, owner = logit_lens.cloze_positions(cloze["sample_offset"].values, cloze["cont_start"].values,
                                                    cloze["cont_end"].values, samples)
    input_ids = cloze["input_ids"].values
    return {
        "n_questions": n_questions, "samples": samples, "owner": owner, "targets": input_ids[token_index + 1],
        "question": question[samples], "choice_index": cloze["choice_index"].values[samples],
        "final_cloze_logprob": cloze["final_cloze_logprob"].values[samples],
        "norm": {"kind": wmdp.attrs["final_norm_kind"], "eps": float(wmdp.attrs["final_norm_eps"]),
                 "weight": wmdp["final_norm_weight"].values, "bias": wmdp["final_norm_bias"].values},
        "lazy": {"last": wmdp["last"].data[:, :n_questions],
                 "cloze_states": cloze["resid"].data[:, token_index],
                 "answer": wmdp["answer"].data[:n_questions],
                 "letter_unembed": wmdp["letter_unembed"].data,
                 "final_letter_logits": wmdp["final_letter_logits"].data[:n_questions]},
    }


def lens_results(inputs: dict, loaded: dict, unembedding: np.ndarray, progress: bool) -> tuple[list[dict], dict]:
    """Rows of ``wmdp_lens_results.csv`` (both scorings) and a summary with self-consistency checks."""
    norm = inputs["norm"]
    if norm["kind"] == "rmsnorm":
        norm = {**norm, "bias": None}
    answer = np.asarray(loaded["answer"]).astype(int)
    letter = logit_lens.letter_predictions(loaded["last"], loaded["letter_unembed"], norm)
    own_letter = np.asarray(loaded["final_letter_logits"]).argmax(axis=1)
    scores = logit_lens.cloze_scores(loaded["cloze_states"], inputs["targets"], inputs["owner"],
                                     len(inputs["samples"]), unembedding, norm, map_blocks=map_threads)
    questions = np.arange(inputs["n_questions"])
    cloze = logit_lens.cloze_predictions(scores, inputs["question"], inputs["choice_index"], questions)
    own_cloze = logit_lens.cloze_predictions(inputs["final_cloze_logprob"][None, :], inputs["question"],
                                             inputs["choice_index"], questions)[0]
    rows = logit_lens.accuracy_rows("letter", letter, answer) + logit_lens.accuracy_rows("cloze", cloze, answer)
    summary = {}
    for scoring, predictions, own in (("letter", letter, own_letter), ("cloze", cloze, own_cloze)):
        accuracy = (predictions == answer[None, :]).mean(axis=1)
        summary[scoring] = {
            "final_layer_accuracy": float(accuracy[-1]), "best_layer": int(accuracy.argmax()),
            "best_accuracy": float(accuracy.max()), "model_own_accuracy": float((own == answer).mean()),
            "final_layer_agreement_with_model": float((predictions[-1] == own).mean())}
    summary["cloze"]["final_layer_max_abs_logprob_difference"] = float(
        np.max(np.abs(scores[-1] - inputs["final_cloze_logprob"]))) if scores.size else 0.0
    summary.update({"n_questions": int(inputs["n_questions"]), "chance": 0.25,
                    "final_norm": f"{norm['kind']} applied once at every layer, in float32"})
    return rows, summary


# --- the whole run -----------------------------------------------------------------------------

class _Stages:
    """The analyze progress bar, timing each stage on the way (``seconds`` in the run's result)."""

    def __init__(self, total: int, progress: bool) -> None:
        self.bar = tqdm(total=total, desc="analyze", disable=not progress)
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._since
        self._since = now
        self.bar.update(1)


def run_analysis(caches: Caches, base: str, outdir: str | Path, options: AnalyzeOptions | None = None,
                 checkpoints: Mapping[str, Any] | None = None,
                 checkpoint_opener: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run every diagnostic and write the output folders; returns a small summary of what was written.

    ``caches[model][split]`` are lazy Datasets; ``checkpoints[model]`` (optional) objects with
    ``family``, ``names()``, ``shape()``, ``read_matrix()`` and ``unembedding()``; missing ones are
    opened from each cache's ``model_path`` with ``checkpoint_opener`` (default ``open_checkpoint``).
    The summary's ``seconds`` says how long each stage took (reading and computing together).
    """
    options = options or AnalyzeOptions()
    outdir = Path(outdir)
    caches = {model: {split: subset_samples(ds, options.max_samples) if split in SPLITS else ds
                      for split, ds in splits.items()} for model, splits in caches.items()}
    validate_caches(caches, base)
    others = [model for model in caches if model != base]
    opened = open_checkpoints(caches, checkpoints, checkpoint_opener)
    for name in others:
        row_space.check_same_shapes(opened[base], opened[name], f"{base} vs {name}")

    stages = _Stages(5 + len(caches), options.progress)
    warming = start_process_pool(sum(caches[base][split]["last"].size for split in SPLITS))  # one model's fits
    bases = {name: row_space.update_bases(opened[base], opened[name], options.top_k, map_layers=map_threads)
             for name in others}
    columns = {name: row_space.column_bases(opened[base], opened[name], options.top_k, map_layers=map_threads)
               for name in others}
    stages.done("row-space bases")

    reference = caches[base]["forget"]
    n_mlp, hidden = reference.sizes["mlp_layer"], reference.sizes["hidden"]
    tables = {base: row_space.projection_table([bases[name] for name in others], n_mlp, hidden, options.top_k,
                                               options.seed)}
    for name in others:
        tables[name] = row_space.projection_table([bases[name]], n_mlp, hidden, options.top_k, options.seed)
    # block l writes into resid[l + 1]: the column-space tables are indexed by residual layer
    written_to = {name: {layer + 1: value for layer, value in columns[name].items()} for name in others}
    resid_tables: dict[str, np.ndarray] = {}
    if any(columns.values()):
        n_resid = reference.sizes["layer"]
        resid_tables[base] = row_space.projection_table([written_to[name] for name in others], n_resid, hidden,
                                                        options.top_k, options.seed)
        for name in others:
            resid_tables[name] = row_space.projection_table([written_to[name]], n_resid, hidden, options.top_k,
                                                            options.seed)
    column_shares: dict[str, dict[str, dict[str, list]]] = {name: {} for name in others}  # [name][model][split]

    moments: dict[str, dict[str, Moments]] = {split: {} for split in SPLITS}
    spectra: dict[str, dict[str, np.ndarray]] = {split: {} for split in SPLITS}
    shares: dict[str, dict[str, dict[str, list]]] = {name: {} for name in others}  # [name][model][split]
    difference: dict[str, dict[str, dict]] = {split: {} for split in SPLITS}
    last: dict[str, dict[str, np.ndarray]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        result = compute(split_reductions(caches, split, base, tables, resid_tables), f"{split} split",
                         options.progress)
        for model, got in result["mlp"].items():
            for index, name in enumerate(others if model == base else [model]):
                shares[name].setdefault(model, {})[split] = row_space.shares_from_energy(
                    got["energy"], got["total"], index, options.top_k)
        for model, got in result["resid_proj"].items():
            for index, name in enumerate(others if model == base else [model]):
                column_shares[name].setdefault(model, {})[split] = row_space.shares_from_energy(
                    got["energy"], got["total"], index, options.top_k)
        for model, m in result["resid"].items():
            spectra[split][model] = covariance.layer_spectra(m, map_layers=map_threads)
            moments[split][model] = m.compact()
        difference[split] = result["dh"]
        last[split] = {model: np.asarray(value, dtype=np.float32) for model, value in result["last"].items()}
        del result
        stages.done(f"{split} split")

    if warming is not None:
        warming.join()
    aucs = {model: separation.layer_aucs(last["forget"][model], last["retain"][model], options.C,
                                         options.max_iter, options.seed, map_layers=map_processes) for model in caches}
    written: dict[str, Any] = {"comparisons": {}, "models": {}}
    for name in others:
        folder = outdir / comparison_name(base, name)
        norm_rows = [row for split in SPLITS for row in norms.norm_rows(
            split, moments[split][base], moments[split][name], difference[split][name])]
        _write_norms(folder / outputs.ACTIVATION_STATS, folder / outputs.ACTIVATION_PLOTS, norm_rows, base, name)
        separation_rows = (separation.separation_rows(base, "a", moments["forget"][base], moments["retain"][base],
                                                      aucs[base])
                           + separation.separation_rows(name, "b", moments["forget"][name],
                                                        moments["retain"][name], aucs[name]))
        _write_separation(folder / outputs.SEPARATION, separation_rows, base, name)
        per_split = {split: covariance.covariance_rows(split, spectra[split][base], spectra[split][name])
                     for split in SPLITS}
        _write_covariance(folder / outputs.COVARIANCE, per_split["forget"] + per_split["retain"],
                          covariance.selectivity_rows(per_split["forget"], per_split["retain"]),
                          {(split, model): spectra[split][model] for split in SPLITS for model in (base, name)},
                          base, name)
        rows = []
        for model in (base, name):
            for layer, (basis, rank, matrices) in bases[name].items():
                got = shares[name][model]
                rows.append(row_space.row_space_row(layer, model, basis, rank, got["forget"][layer],
                                                    got["retain"][layer], matrices))
        for model in (base, name):
            for layer, (basis, rank, matrices) in columns[name].items():
                got = column_shares[name][model]
                rows.append(row_space.row_space_row(layer, model, basis, rank, got["forget"][layer + 1],
                                                    got["retain"][layer + 1], matrices, space="column"))
        _write_row_space(folder / outputs.ROW_SPACE, rows, base, name, options.top_k, options.seed)
        written["comparisons"][name] = str(folder)
    stages.done("separation AUCs and comparison outputs")

    for model in caches:
        folder = outdir / model
        rows = probes.probe_rows(last["forget"][model], last["retain"][model], options.C, options.max_iter,
                                 options.seed, map_layers=map_processes)
        _write_probes(folder / outputs.PROBES, rows, model, options)
        written["models"][model] = {outputs.PROBES: str(folder / outputs.PROBES)}
        stages.done("linear probes")

    lens_models = [model for model in caches if all(split in caches[model] for split in LENS_SPLITS)]
    if lens_models:
        inputs = {model: lens_inputs(caches[model]["wmdp"], caches[model]["wmdp_cloze"], options.max_samples)
                  for model in lens_models}
        loaded = compute({model: inputs[model]["lazy"] for model in lens_models}, "wmdp splits", options.progress)
        for model in lens_models:
            rows, summary = lens_results(inputs[model], loaded[model], opened[model].unembedding(), options.progress)
            _write_lens(outputs.model_dir(outdir, model) / outputs.LOGIT_LENS, rows, summary, model)
            written["models"][model][outputs.LOGIT_LENS] = str(outputs.model_dir(outdir, model) / outputs.LOGIT_LENS)
    else:
        written["skipped"] = "no wmdp/wmdp_cloze splits in the caches: the logit lens was not run"
    stages.done("logit lens")
    stages.bar.close()
    written["options"] = asdict(options)
    written["seconds"] = stages.seconds
    return written
