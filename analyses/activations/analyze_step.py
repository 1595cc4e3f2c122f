"""``unlearn-lens analyze`` as ``run(settings)``: every activation diagnostic from the caches.

The command and the pipeline build ``AnalyzeSettings`` and call ``run_analyze``, which opens and
checks the caches, picks the dask scheduler and hands over to ``runner.run_analysis``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_at_least, check_counts, check_positive
from unlearn_lens.core.settings import DEFAULT_SEED

#: The activation analyses' defaults: probe regularisation, solver iterations, row-space dimension.
DEFAULT_C = 1.0
DEFAULT_MAX_ITER = 1000
DEFAULT_TOP_K = 16



@dataclass(frozen=True)
class AnalyzeSettings:
    """Everything ``run_analyze`` needs (the `analyze` command's flags)."""

    base_cache: str  # the base model's cache (path or fsspec URL)
    compare: tuple[str, ...]  # NAME=CACHE of each modified model
    outdir: str
    base_name: str = "base"
    scheduler: str | None = None  # address of a dask.distributed scheduler
    workers: int | None = None
    processes: bool = False
    max_samples: int | None = None
    C: float = DEFAULT_C
    max_iter: int = DEFAULT_MAX_ITER
    top_k: int = DEFAULT_TOP_K
    seed: int = DEFAULT_SEED
    checkpoints: tuple[str, ...] = ()  # NAME=MODEL: read NAME's weights from MODEL
    progress: bool = True
    allow_mismatch: bool = False  # combine a checkpoint whose fingerprint differs from its cache's record


def dask_scheduler(address: str | None, workers: int | None, processes: bool):
    """A context that makes ``dask.compute`` use the chosen scheduler."""
    import dask

    if address and workers:
        raise UserError("--scheduler and --workers exclude each other (the cluster decides its workers)")
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


def run_analyze(settings: AnalyzeSettings) -> dict:
    """Open the caches, check them, and run every activation analysis; returns ``run_analysis``'s record."""
    from analyses.activations.caches import open_model_caches, parse_compare
    from analyses.weights.checkpoints import open_checkpoint
    from analyses.activations.runner import AnalyzeOptions, run_analysis
    from cache_store.integrity import name_damaged_chunks

    s = settings
    check_at_least("--top-k", s.top_k, 1)
    check_at_least("--max-iter", s.max_iter, 1)
    check_positive("--C", s.C)
    check_counts(max_samples=s.max_samples, workers=s.workers)
    named = {s.base_name: s.base_cache, **parse_compare(s.compare, s.base_name)}
    with name_damaged_chunks(named.values()):  # a chunk failing its checksum stops the run in one line
        caches = {name: open_model_caches(url) for name, url in named.items()}
    options = AnalyzeOptions(max_samples=s.max_samples, C=s.C, max_iter=s.max_iter, top_k=s.top_k, seed=s.seed,
                             progress=s.progress, allow_mismatch=s.allow_mismatch)
    checkpoints = {}
    for value in s.checkpoints:
        name, sep, spec = value.partition("=")
        if not sep or name not in named or not spec:
            raise UserError(f"--checkpoint {value!r}: expected NAME=MODEL with NAME one of {', '.join(named)}")
        checkpoints[name] = open_checkpoint(spec)
    with name_damaged_chunks(named.values()), dask_scheduler(s.scheduler, s.workers, s.processes):
        return run_analysis(caches, s.base_name, s.outdir, options, checkpoints=checkpoints)
