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

This module is the orchestration (``AnalyzeOptions``, ``run_analysis``); the caches are opened in
``caches`` and checked in ``inputs``, evaluated by ``execution``, the lens is fed by ``lens_step``
and every folder is written by ``writers``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from analyses.activations import covariance, norms, probes, row_space, separation
from analyses.activations.caches import LENS_SPLITS, SPLITS
from analyses.activations.execution import compute, map_processes, map_threads, start_process_pool
from analyses.activations.inputs import Caches, check_weights, open_checkpoints, subset_samples, validate_caches
from analyses.activations.lens_step import lens_inputs, lens_results
from analyses.activations.reductions import Moments, difference_norms, projected_energy, token_moments
from analyses.activations.writers import (
    write_covariance,
    write_lens,
    write_norms,
    write_probes,
    write_row_space,
    write_separation,
)
from cache_store.identity import identity_of
from unlearn_lens.core import outputs
from unlearn_lens.core.identity import plain
from unlearn_lens.core.outputs import comparison_name


@dataclass
class AnalyzeOptions:
    """Knobs of ``unlearn-lens analyze`` (see the command's --help)."""

    max_samples: int | None = None
    C: float = 1.0
    max_iter: int = 1000
    top_k: int = 16
    seed: int = 0
    progress: bool = True
    allow_mismatch: bool = False  # read checkpoints whose fingerprint differs from the one their cache records


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
        if "mlp_in" in ds.variables:  # recorded unless captured with --variables resid
            lazy["mlp"][model] = projected_energy(ds["mlp_in"].data, mask, tables[model])
        if resid_tables:
            lazy["resid_proj"][model] = projected_energy(ds["resid"].data, mask, resid_tables[model])
        lazy["last"][model] = ds["last"].data
        if model != base:
            lazy["dh"][model] = difference_norms(caches[base][split]["resid"].data, ds["resid"].data, mask)
    return lazy


def space_rows(name: str, base: str, bases: Mapping, columns: Mapping, shares: Mapping,
               column_shares: Mapping) -> list[dict]:
    """The row-space (``mlp_in[l]``) and column-space (``resid[l + 1]``) rows of one comparison (the
    bases are those of the blocks whose activations the caches hold)."""
    rows = []
    for model in (base, name):
        for layer, (basis, rank, matrices) in bases.items():
            got = shares[model]
            rows.append(row_space.row_space_row(layer, model, basis, rank, got["forget"][layer],
                                                got["retain"][layer], matrices))
    for model in (base, name):
        for layer, (basis, rank, matrices) in columns.items():
            got = column_shares[model]
            rows.append(row_space.row_space_row(layer, model, basis, rank, got["forget"][layer + 1],
                                                got["retain"][layer + 1], matrices, space="column"))
    return rows


def not_captured(blocks: list[int], mlp_layers: list[int], resid_layers: list[int]) -> str:
    """One line naming the blocks whose row-space rows a partial capture (``--layers``, ``--variables
    resid``) leaves out; empty when the caches hold every block's activations."""
    left_out = {"row": [b for b in blocks if b not in mlp_layers],
                "column": [b for b in blocks if b + 1 not in resid_layers]}
    parts = [f"{space} space of blocks {','.join(map(str, found))} (their "
             f"{'mlp_in' if space == 'row' else 'resid[l+1]'} was not captured)"
             for space, found in left_out.items() if found]
    return ("row-space rows left out: " + "; ".join(parts)) if parts else ""


# --- what a run is made from, and the folders it writes ---------------------------------------

def analysis_inputs(caches: Caches, weights: Mapping[str, Any], options: AnalyzeOptions) -> dict[str, Any]:
    """The ``inputs`` every folder's marker records: each cache's identity (its recorded weights and
    token fingerprints), each checkpoint's fingerprint, and the options that change results."""
    settings = {key: value for key, value in asdict(options).items() if key != "progress"}
    return plain({"caches": {model: identity_of({split: ds.attrs for split, ds in splits.items()})
                             for model, splits in caches.items()},
                  "weights": {model: found["checkpoint"] for model, found in weights.items()},
                  "settings": settings})


def invalidate(outdir: Path, base: str, models: list[str]) -> None:
    """Remove the completion marker of every folder this run writes, before it computes anything.

    A folder an earlier run wrote from other caches then counts as unfinished until this run
    rewrites it; killed half way, the run leaves folders of the earlier run unmarked (``report``
    skips them and says so), never marked complete beside this run's.
    """
    folders = [outputs.comparison_dir(outdir, base, model) / folder for model in models if model != base
               for folder in COMPARISON_FOLDERS]
    folders += [outputs.model_dir(outdir, model) / folder for model in models for folder in MODEL_FOLDERS]
    for folder in folders:
        outputs.clear_complete(folder)


#: the folders analyze writes: per comparison, and per model
COMPARISON_FOLDERS = (outputs.ACTIVATION_STATS, outputs.ACTIVATION_PLOTS, outputs.SEPARATION, outputs.COVARIANCE,
                      outputs.ROW_SPACE)
MODEL_FOLDERS = (outputs.PROBES, outputs.LOGIT_LENS)


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
    weights = check_weights(caches, opened, options.allow_mismatch)
    made_from = analysis_inputs(caches, weights, options)
    invalidate(outdir, base, list(caches))  # a run killed half way leaves no folder of an earlier run marked complete
    for name in others:
        row_space.check_same_shapes(opened[base], opened[name], f"{base} vs {name}")

    stages = _Stages(5 + len(caches), options.progress)
    warming = start_process_pool(sum(caches[base][split]["last"].size for split in SPLITS))  # one model's fits
    reference = caches[base]["forget"]
    hidden = reference.sizes["hidden"]
    # the layers the caches hold (all of them unless captured with --layers; checked equal in every cache):
    # bases are computed for the blocks whose activations are there only
    resid_layers = [int(v) for v in reference["layer"].values]
    mlp_layers = [int(v) for v in reference["mlp_layer"].values] if "mlp_in" in reference.variables else []
    blocks = list(range(int(reference.attrs.get("num_layers", len(resid_layers) - 1))))
    writers = [block for block in blocks if block + 1 in resid_layers]
    bases = {name: row_space.update_bases(opened[base], opened[name], options.top_k, map_layers=map_threads,
                                          layers=mlp_layers)
             for name in others}
    columns = {name: row_space.column_bases(opened[base], opened[name], options.top_k, map_layers=map_threads,
                                            layers=writers)
               for name in others}
    stages.done("row-space bases")

    tables = {base: row_space.projection_table([bases[name] for name in others], mlp_layers, hidden, options.top_k,
                                               options.seed)}
    for name in others:
        tables[name] = row_space.projection_table([bases[name]], mlp_layers, hidden, options.top_k, options.seed)
    # block l writes into resid[l + 1]: the column-space tables are indexed by residual layer
    written_to = {name: {layer + 1: value for layer, value in columns[name].items()} for name in others}
    resid_tables: dict[str, np.ndarray] = {}
    if any(columns.values()):
        resid_tables[base] = row_space.projection_table([written_to[name] for name in others], resid_layers, hidden,
                                                        options.top_k, options.seed)
        for name in others:
            resid_tables[name] = row_space.projection_table([written_to[name]], resid_layers, hidden, options.top_k,
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
                shares[name].setdefault(model, {})[split] = dict(zip(mlp_layers, row_space.shares_from_energy(
                    got["energy"], got["total"], index, options.top_k)))
        for model, got in result["resid_proj"].items():
            for index, name in enumerate(others if model == base else [model]):
                column_shares[name].setdefault(model, {})[split] = dict(zip(resid_layers, row_space.shares_from_energy(
                    got["energy"], got["total"], index, options.top_k)))
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
            split, moments[split][base], moments[split][name], difference[split][name], resid_layers)]
        write_norms(folder / outputs.ACTIVATION_STATS, folder / outputs.ACTIVATION_PLOTS, norm_rows, base, name,
                    inputs=made_from)
        separation_rows = (separation.separation_rows(base, "a", moments["forget"][base], moments["retain"][base],
                                                      aucs[base], resid_layers)
                           + separation.separation_rows(name, "b", moments["forget"][name],
                                                        moments["retain"][name], aucs[name], resid_layers))
        write_separation(folder / outputs.SEPARATION, separation_rows, base, name, inputs=made_from)
        per_split = {split: covariance.covariance_rows(split, spectra[split][base], spectra[split][name],
                                                       resid_layers) for split in SPLITS}
        write_covariance(folder / outputs.COVARIANCE, per_split["forget"] + per_split["retain"],
                          covariance.selectivity_rows(per_split["forget"], per_split["retain"]),
                          {(split, model): spectra[split][model] for split in SPLITS for model in (base, name)},
                          base, name, resid_layers, inputs=made_from)
        rows = space_rows(name, base, bases[name], columns[name], shares[name], column_shares[name])
        missing = not_captured(blocks, mlp_layers, resid_layers)
        write_row_space(folder / outputs.ROW_SPACE, rows, base, name, options.top_k, options.seed, missing,
                        inputs=made_from)
        if missing:
            written.setdefault("notes", []).append(f"{base} -> {name}: {missing}")
        written["comparisons"][name] = str(folder)
    stages.done("separation AUCs and comparison outputs")

    for model in caches:
        folder = outdir / model
        rows = probes.probe_rows(last["forget"][model], last["retain"][model], options.C, options.max_iter,
                                 options.seed, map_layers=map_processes, layers=resid_layers)
        write_probes(folder / outputs.PROBES, rows, model, options.C, options.max_iter, options.seed, inputs=made_from)
        written["models"][model] = {outputs.PROBES: str(folder / outputs.PROBES)}
        stages.done("linear probes")

    lens_models = [model for model in caches if all(split in caches[model] for split in LENS_SPLITS)]
    if lens_models:
        inputs = {model: lens_inputs(caches[model]["wmdp"], caches[model]["wmdp_cloze"], options.max_samples)
                  for model in lens_models}
        loaded = compute({model: inputs[model]["lazy"] for model in lens_models}, "wmdp splits", options.progress)
        for model in lens_models:
            rows, summary = lens_results(inputs[model], loaded[model], opened[model].unembedding(), options.progress)
            write_lens(outputs.model_dir(outdir, model) / outputs.LOGIT_LENS, rows, summary, model, inputs=made_from)
            written["models"][model][outputs.LOGIT_LENS] = str(outputs.model_dir(outdir, model) / outputs.LOGIT_LENS)
    else:
        written["skipped"] = "no wmdp/wmdp_cloze splits in the caches: the logit lens was not run"
    stages.done("logit lens")
    stages.bar.close()
    written["weights"] = weights
    written["options"] = asdict(options)
    written["seconds"] = stages.seconds
    return written
