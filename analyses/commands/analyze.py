"""``unlearn-lens analyze``: every activation diagnostic from caches, without running a model."""

from __future__ import annotations

import contextlib

import click

from unlearn_lens.core.errors import UserError


def _scheduler(address: str | None, workers: int | None, processes: bool):
    """A context that makes ``dask.compute`` use the chosen scheduler."""
    import dask

    if address and workers:
        raise UserError("--scheduler and --workers exclude each other (the cluster decides its workers)")
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    if address:
        from distributed import Client

        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"could not reach the dask scheduler at {address}: {exc}") from None
        return client
    if processes:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True)
        stack = contextlib.ExitStack()
        stack.enter_context(cluster)
        stack.enter_context(Client(cluster))
        return stack
    return dask.config.set(scheduler="threads", num_workers=workers)


@click.command("analyze")
@click.option("--base", "base_cache", required=True, metavar="CACHE",
              help="Activation cache of the base (reference) model: a path or fsspec URL written by `unlearn-lens capture`.")
@click.option("--compare", "compares", multiple=True, required=True, metavar="NAME=CACHE",
              help="A modified model's cache and the name used for its output folders; repeat for several models.")
@click.option("--outdir", required=True, type=click.Path(file_okay=False),
              help="Output root: OUT/<base>__to__<name>/ per comparison and OUT/<model>/ per model.")
@click.option("--base-name", default="base", show_default=True, help="Name of the base model in folder names and CSVs.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Address of a running dask.distributed scheduler (e.g. tcp://host:8786); default: local threads.")
@click.option("--workers", type=int, default=None,
              help="Local dask workers (threads, or processes with --processes); with threads also the number of "
                   "processes fitting the probes and separation classifiers. Default: one per core.")
@click.option("--processes", is_flag=True,
              help="Run the local workers as processes (a dask.distributed LocalCluster) instead of threads.")
@click.option("--max-samples", type=int, default=None,
              help="Use at most this many texts per forget/retain split and this many WMDP questions (default: all).")
@click.option("--C", "C", type=float, default=1.0, show_default=True,
              help="Inverse regularisation strength of the logistic-regression probes.")
@click.option("--max-iter", type=int, default=1000, show_default=True, help="Iteration cap of the probes' solver.")
@click.option("--top-k", type=int, default=16, show_default=True,
              help="Dimension of dW's top right-singular subspace in the row-space projection.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the probe folds, held-out splits and random baseline subspaces.")
@click.option("--checkpoint", "checkpoint_specs", multiple=True, metavar="NAME=MODEL",
              help="Read model NAME's weights from MODEL (directory, .gguf or hub id) instead of the path its cache "
                   "records (e.g. caches copied to another machine); repeatable.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def analyze(base_cache, compares, outdir, base_name, scheduler, workers, processes, max_samples, C, max_iter,
            top_k, seed, checkpoint_specs, no_progress):
    """Norms, separation, covariance, row-space projection, linear probes and the logit lens.

    Reads only the caches (each chunk once per split) and, for the row-space projection and the
    cloze lens, the checkpoints' MLP input matrices and unembedding. No model is run.
    """
    from analyses.activations.caches import open_model_caches, parse_compare
    from analyses.activations.runner import AnalyzeOptions, run_analysis

    if top_k < 1:
        raise UserError("--top-k must be at least 1")
    if max_iter < 1 or C <= 0:
        raise UserError("--max-iter must be at least 1 and --C positive")
    from cache_store.integrity import name_damaged_chunks

    named = {base_name: base_cache, **parse_compare(compares, base_name)}
    with name_damaged_chunks(named.values()):  # a chunk failing its checksum stops the run in one line
        caches = {name: open_model_caches(url) for name, url in named.items()}
    options = AnalyzeOptions(max_samples=max_samples, C=C, max_iter=max_iter, top_k=top_k, seed=seed,
                             progress=not no_progress)
    from analyses.weights.checkpoints import open_checkpoint

    checkpoints = {}
    for value in checkpoint_specs:
        name, sep, spec = value.partition("=")
        if not sep or name not in named or not spec:
            raise UserError(f"--checkpoint {value!r}: expected NAME=MODEL with NAME one of {', '.join(named)}")
        checkpoints[name] = open_checkpoint(spec)
    with name_damaged_chunks(named.values()), _scheduler(scheduler, workers, processes):
        written = run_analysis(caches, base_name, outdir, options, checkpoints=checkpoints)
    for name, folder in written["comparisons"].items():
        click.echo(f"{base_name} -> {name}: {folder}")
    for model, folders in written["models"].items():
        click.echo(f"{model}: " + ", ".join(folders.values()))
    if "skipped" in written:
        click.echo(f"note: {written['skipped']}")
    seconds = written["seconds"]
    stages = ", ".join(f"{stage} {took:.1f} s" for stage, took in seconds.items())
    click.echo(f"took {sum(seconds.values()):.1f} s ({stages})")
