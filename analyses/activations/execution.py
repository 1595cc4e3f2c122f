"""Where analyze's work runs: one ``dask.compute`` for the lazy reductions, local threads for
in-memory linear algebra, local processes for scikit-learn fits.

On a ``dask.distributed`` client ``compute`` hands the graph to the cluster; locally each pool
keeps BLAS single-threaded so that workers do not oversubscribe the cores.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Iterable

import dask
import dask.array as da
import numpy as np

from analyses.activations import separation


def _client_active() -> bool:
    """True when a ``dask.distributed`` client is the default scheduler."""
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
    """Workers of the local pools: dask's ``num_workers`` setting, else every core."""
    return dask.config.get("num_workers", None) or os.cpu_count() or 1


def map_threads(function: Callable, items: Iterable) -> list:
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


def map_processes(function: Callable, *iterables: Iterable) -> list:
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
