"""``unlearn-lens analyze``: every activation diagnostic from caches, without running a model."""

from __future__ import annotations

import click

from analyses.activations.analyze_step import DEFAULT_C, DEFAULT_MAX_ITER, DEFAULT_TOP_K
from unlearn_lens import options


@click.command("analyze")
@click.option("--base", "base_cache", required=True, metavar="CACHE",
              help="Activation cache of the base (reference) model: a path or fsspec URL written by `unlearn-lens capture`.")
@click.option("--compare", "compares", multiple=True, required=True, metavar="NAME=CACHE",
              help="A modified model's cache and the name used for its output folders; repeat for several models.")
@options.outdir(help="Output root: OUT/<base>__to__<name>/ per comparison and OUT/<model>/ per model.")
@click.option("--base-name", default="base", show_default=True, help="Name of the base model in folder names and CSVs.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Address of a running dask.distributed scheduler (e.g. tcp://host:8786); default: local threads.")
@options.workers(help="Local dask workers (threads, or processes with --processes); with threads also the number of "
                   "processes fitting the probes and separation classifiers. Default: one per core.")
@click.option("--processes", is_flag=True,
              help="Run the local workers as processes (a dask.distributed LocalCluster) instead of threads.")
@options.max_samples(help="Use at most this many texts per forget/retain split and this many WMDP questions "
                          "(default: all).")
@click.option("--C", "C", type=float, default=DEFAULT_C, show_default=True,
              help="Inverse regularisation strength of the logistic-regression probes.")
@click.option("--max-iter", type=int, default=DEFAULT_MAX_ITER, show_default=True,
              help="Iteration cap of the probes' solver.")
@click.option("--top-k", type=int, default=DEFAULT_TOP_K, show_default=True,
              help="Dimension of dW's top right-singular subspace in the row-space projection.")
@options.seed(help="Seed of the probe folds, held-out splits and random baseline subspaces.")
@click.option("--checkpoint", "checkpoint_specs", multiple=True, metavar="NAME=MODEL",
              help="Read model NAME's weights from MODEL (directory, .gguf or hub id) instead of the path its cache "
                   "records (e.g. caches copied to another machine); repeatable.")
@click.option("--allow-mismatch", is_flag=True,
              help="Read a checkpoint whose weights differ from those its cache was captured from (the cache's "
                   "checkpoint_fingerprint); without it analyze refuses, naming both fingerprints.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def analyze(base_cache, compares, outdir, base_name, scheduler, workers, processes, max_samples, C, max_iter,
            top_k, seed, checkpoint_specs, allow_mismatch, no_progress):
    """Norms, separation, covariance, row-space projection, linear probes and the logit lens.

    Reads only the caches (each chunk once per split) and, for the row-space projection and the
    cloze lens, the checkpoints' MLP input matrices and unembedding. No model is run.
    """
    from analyses.activations.analyze_step import AnalyzeSettings, run_analyze

    written = run_analyze(AnalyzeSettings(
        base_cache=base_cache, compare=tuple(compares), outdir=outdir, base_name=base_name, scheduler=scheduler,
        workers=workers, processes=processes, max_samples=max_samples, C=C, max_iter=max_iter, top_k=top_k,
        seed=seed, checkpoints=tuple(checkpoint_specs), progress=not no_progress, allow_mismatch=allow_mismatch))
    for name, folder in written["comparisons"].items():
        click.echo(f"{base_name} -> {name}: {folder}")
    for model, folders in written["models"].items():
        click.echo(f"{model}: " + ", ".join(folders.values()))
    for model, found in written.get("weights", {}).items():
        if found["checkpoint"] and found["checkpoint"] != found["cache"]:
            click.echo(f"note: {model}: compared with weights other than those captured (--allow-mismatch: "
                       f"checkpoint {found['checkpoint']}, cache {found['cache']})", err=True)
        elif not found["cache"]:
            click.echo(f"note: {model}: its cache records no checkpoint_fingerprint (captured before it was "
                       "recorded, or from weights read only with torch): its checkpoint was not checked", err=True)
    if "skipped" in written:
        click.echo(f"note: {written['skipped']}")
    for note in written.get("notes", []):
        click.echo(f"note: {note}")
    seconds = written["seconds"]
    stages = ", ".join(f"{stage} {took:.1f} s" for stage, took in seconds.items())
    click.echo(f"took {sum(seconds.values()):.1f} s ({stages})")
