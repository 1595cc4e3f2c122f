"""Pair the linear weights of two checkpoints and map a per-matrix job over them, in parallel.

Pairing reads only headers, so a mismatch (family, missing tensor, shape) stops the run at once
with one line naming the first differing tensor. Jobs run in worker processes, each opening the
checkpoints itself and reading only the tensors of its own matrix, so peak memory is a few
matrices per worker whatever the number of layers.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from analyses.weights.checkpoints import Checkpoint, open_checkpoint
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_counts
from unlearn_lens.core.naming import classify, is_embedding_weight, is_linear_weight, is_transposed

#: Group of the weights outside the blocks (embeddings, untied unembedding); layer -1.
EMBED_GROUP = "embed"


@dataclass(frozen=True)
class MatrixPair:
    """One 2-D weight present in both checkpoints; ``shape`` is (out, in) for block matrices.

    ``group`` is ``attn`` / ``mlp`` for block matrices and ``embed`` (layer -1) for embeddings and
    an untied unembedding, whose shape is as stored, (vocab or positions, hidden).
    """

    name: str
    layer: int
    group: str
    role: str
    shape: tuple[int, int]


def _oriented_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    shape = ckpt.shape(name)
    return tuple(reversed(shape)) if is_transposed(name, ckpt.family) else shape


def _tied(ckpt: Checkpoint) -> bool:
    return ckpt.config.get("tie_word_embeddings") is True


def pair_linear_weights(ckpt_a: Checkpoint, ckpt_b: Checkpoint) -> list[MatrixPair]:
    """Every 2-D weight of both models, by (layer, name); one-line error on mismatch.

    Block matrices (attention, MLP) and, in group ``embed``, the embeddings and an unembedding
    the config does not tie to the input embedding (a tied copy would repeat the embedding's row).
    """
    if ckpt_a.family != ckpt_b.family:
        raise UserError(f"architectures differ: model A is {ckpt_a.family}, model B is {ckpt_b.family}")
    family = ckpt_a.family

    def linear(ckpt: Checkpoint) -> set[str]:
        found = set()
        for n in ckpt.names():
            ndim = len(ckpt.shape(n))
            if is_linear_weight(n, family, ndim):
                found.add(n)
            elif is_embedding_weight(n, family, ndim):
                if not (_tied(ckpt) and classify(n, family).role == "unembed"):
                    found.add(n)
        return found

    names_a, names_b = linear(ckpt_a), linear(ckpt_b)
    if not any(classify(n, family).layer >= 0 for n in names_a):
        raise UserError(f"{ckpt_a.path}: no attention/MLP weight matrices found")
    def model_order(n: str) -> tuple[int, int, str]:  # embeddings, blocks by layer, unembedding
        info = classify(n, family)
        return (2 if info.role == "unembed" else 0 if info.layer < 0 else 1, info.layer, n)

    differing = sorted(names_a ^ names_b, key=model_order)
    if differing:
        first = differing[0]
        where, missing = ("A", "B") if first in names_a else ("B", "A")
        raise UserError(f"architectures differ: tensor {first} is in model {where} but not in model {missing}")
    pairs = []
    for name in sorted(names_a, key=model_order):
        shape_a, shape_b = ckpt_a.shape(name), ckpt_b.shape(name)
        if tuple(shape_a) != tuple(shape_b):
            raise UserError(f"shapes differ: tensor {name} is {tuple(shape_a)} in model A but {tuple(shape_b)} in model B")
        info = classify(name, family)
        out_in = _oriented_shape(ckpt_a, name)
        group = info.group if info.layer >= 0 else EMBED_GROUP
        pairs.append(MatrixPair(name, info.layer, group, info.role, (int(out_in[0]), int(out_in[1]))))
    return pairs


# --- worker processes --------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(path_a: str, path_b: str, blas_threads: int) -> None:
    from threadpoolctl import threadpool_limits

    _WORKER["limits"] = threadpool_limits(blas_threads)
    _WORKER["a"] = open_checkpoint(path_a)
    _WORKER["b"] = open_checkpoint(path_b)


def _run_in_worker(task: tuple[Callable, MatrixPair, dict]) -> Any:
    job, pair, options = task
    return job(_WORKER["a"], _WORKER["b"], pair, **options)


def map_pairs(
    job: Callable[..., Any],
    pairs: Sequence[MatrixPair],
    ckpt_a: Checkpoint,
    ckpt_b: Checkpoint,
    workers: int = 1,
    options: dict | None = None,
    desc: str = "matrices",
) -> list[Any]:
    """``[job(ckpt_a, ckpt_b, pair, **options) for pair in pairs]``, in order, over ``workers`` processes.

    ``job`` must be a module-level function (it is sent to the workers by reference). Each worker
    limits BLAS to its share of the cores so that workers do not oversubscribe them.
    """
    options = dict(options or {})
    check_counts(workers=workers)
    progress = dict(total=len(pairs), desc=desc, unit="matrix", disable=None)
    if workers == 1 or len(pairs) <= 1:
        return [job(ckpt_a, ckpt_b, pair, **options) for pair in tqdm(pairs, **progress)]
    blas_threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(
        max_workers=min(workers, len(pairs)),
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(ckpt_a.path, ckpt_b.path, blas_threads),
    ) as pool:
        tasks = [(job, pair, options) for pair in pairs]
        return list(tqdm(pool.map(_run_in_worker, tasks), **progress))
