"""Row-space projection: does the MLP input energy fall where the update acts?

For block l, dW stacks the updates of the MLP's input-side matrices (up, and gate where there is
one), each oriented (out, in), so its right singular vectors live in the MLP input space. With V_k
the top-k right singular vectors (k = min(top_k, numerical rank of dW)) and M = sum x x^T over the
masked MLP inputs of a split, the energy share is trace(V_k^T M V_k) / trace(M): the fraction of
input energy the update can see. The chance baseline is the same share for a random orthonormal
subspace of equal dimension (fixed seed), whose expectation is k / d.

Matrices that write into the residual stream (attention output, MLP down-projection) have their
row space in a width the cache does not hold (the MLP hidden width, the attention heads). For
them the residual side is the output side: U_k, the top-k left singular vectors of the stacked
writing updates [dW_out | dW_down] of block l (the directions the update writes), and the
projected activations are the residual stream block l writes into, ``resid[l + 1]``. Rows of
that kind (``space`` = ``column``) exist only for blocks whose writing matrices changed; rows of
the first kind have ``space`` = ``row``. The summary's mean selectivity averages every row with
a finite ratio, of either space, so every update that changes a block gets a value.
"""

from __future__ import annotations

import numpy as np

from unlearn_lens.core.errors import UserError
from unlearn_lens.core.naming import MLP_INPUT_ROLES, STREAM_WRITE_ROLES, classify

COLUMNS = ["mlp_layer", "activations", "k", "hidden", "dW_rank", "share_forget", "share_retain",
           "selectivity_ratio", "random_share_forget", "random_share_retain", "random_selectivity_ratio",
           "chance_share", "matrices", "space", "projected"]
#: ``space`` of a row: dW's row space (input side, reading matrices) or column space (output side, writing ones).
SPACES = ("row", "column")


def _names_with_roles(checkpoint, family: str, roles) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name in checkpoint.names():
        if not name.endswith(".weight"):
            continue
        info = classify(name, family)
        if info.layer >= 0 and info.role in roles and len(checkpoint.shape(name)) == 2:
            names.setdefault(info.layer, []).append(name)
    return {layer: sorted(found) for layer, found in sorted(names.items())}


def mlp_input_names(checkpoint, family: str) -> dict[int, list[str]]:
    """Per block: names of the 2-D weights of the MLP's input-side matrices (up, gate)."""
    return _names_with_roles(checkpoint, family, MLP_INPUT_ROLES)


def stream_write_names(checkpoint, family: str) -> dict[int, list[str]]:
    """Per block: names of the matrices that write into the residual stream (attention output, down)."""
    return _names_with_roles(checkpoint, family, STREAM_WRITE_ROLES)


def check_same_shapes(checkpoint_a, checkpoint_b, label: str) -> None:
    """Refuse a comparison whose checkpoints differ in tensor names or shapes (names the first)."""
    names_a, names_b = set(checkpoint_a.names()), set(checkpoint_b.names())
    if names_a != names_b:
        first = sorted(names_a ^ names_b)[0]
        raise UserError(f"{label}: the checkpoints hold different tensors (first difference: {first}); "
                        "compare models of the same architecture")
    for name in sorted(names_a):
        if tuple(checkpoint_a.shape(name)) != tuple(checkpoint_b.shape(name)):
            raise UserError(f"{label}: tensor {name} has shape {tuple(checkpoint_a.shape(name))} in one checkpoint "
                            f"and {tuple(checkpoint_b.shape(name))} in the other")


def update_gram(checkpoint_a, checkpoint_b, names: list[str], side: str = "row") -> np.ndarray:
    """Gram matrix (d x d, float64) of the stacked updates, read one tensor at a time.

    ``side="row"``: dW^T dW of the updates stacked on top of each other (input side, shared width);
    ``side="column"``: dW dW^T of the updates set side by side (output side, shared width). The
    eigenvectors of the first are dW's right singular vectors, of the second its left ones.
    """
    gram = None
    for name in names:
        delta = checkpoint_b.read_matrix(name).astype(np.float64) - checkpoint_a.read_matrix(name).astype(np.float64)
        part = delta.T @ delta if side == "row" else delta @ delta.T
        gram = part if gram is None else gram + part
    return gram


def top_right_singular(gram: np.ndarray, top_k: int, tolerance: float = 1e-6) -> tuple[np.ndarray, int]:
    """``(V_k, rank)``: the top-k right singular vectors of dW from dW^T dW, k capped by the rank.

    The numerical rank counts singular values above ``tolerance`` x the largest (the inputs are
    float32 weights, so smaller singular values are round-off).
    """
    if not np.any(gram):  # this block was not updated: no subspace (and no O(d^3) work)
        return np.zeros((gram.shape[0], 0)), 0
    eigenvalues, eigenvectors = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(eigenvalues)[::-1]
    singular = np.sqrt(np.clip(eigenvalues[order], 0, None))
    rank = int((singular > tolerance * singular[0]).sum()) if singular[0] > 0 else 0
    k = min(top_k, rank)
    return eigenvectors[:, order[:k]], rank


def random_subspace(hidden: int, k: int, seed: int, layer: int) -> np.ndarray:
    """A random orthonormal (hidden, k) basis, reproducible from (seed, layer)."""
    if k == 0:
        return np.zeros((hidden, 0))
    rng = np.random.default_rng([seed, layer])
    q, _ = np.linalg.qr(rng.normal(size=(hidden, k)))
    return q


def energy_share(second_moment: np.ndarray, basis: np.ndarray) -> float:
    """trace(V^T M V) / trace(M): share of sum ||x||^2 lying in span(V) (V orthonormal)."""
    total = float(np.trace(second_moment))
    if total <= 0:
        return float("nan")
    return float(np.einsum("ik,ij,jk->", basis, second_moment, basis) / total)


def _ratio(a: float, b: float) -> float:
    if b == 0 or not np.isfinite(b) or not np.isfinite(a):
        return float("nan")
    return float(a / b)


def split_shares(second_moment: np.ndarray, basis: np.ndarray, seed: int, layer: int) -> tuple[float, float]:
    """``(share in span(V_k), share in a random subspace of equal dimension)`` for one split."""
    random_basis = random_subspace(basis.shape[0], basis.shape[1], seed, layer)
    return energy_share(second_moment, basis), energy_share(second_moment, random_basis)


def row_space_row(layer: int, activations: str, basis: np.ndarray, rank: int, forget: tuple[float, float],
                  retain: tuple[float, float], matrices: list[str], space: str = "row") -> dict:
    """The CSV row of one (block, space, model whose activations are projected) from both splits' shares.

    ``space="row"`` projects the block's MLP inputs (``mlp_in[layer]``) on dW's row space;
    ``space="column"`` the residual stream the block writes into (``resid[layer + 1]``) on its column space.
    """
    hidden, k = basis.shape
    return {"mlp_layer": layer, "activations": activations, "k": k, "hidden": hidden, "dW_rank": rank,
            "share_forget": forget[0], "share_retain": retain[0], "selectivity_ratio": _ratio(forget[0], retain[0]),
            "random_share_forget": forget[1], "random_share_retain": retain[1],
            "random_selectivity_ratio": _ratio(forget[1], retain[1]), "chance_share": k / hidden,
            "matrices": ";".join(matrices), "space": space,
            "projected": f"mlp_in[{layer}]" if space == "row" else f"resid[{layer + 1}]"}


def projection_table(bases: list[dict[int, tuple[np.ndarray, int, list[str]]]], layers: int | list[int],
                     hidden: int, top_k: int, seed: int) -> np.ndarray:
    """(layer, hidden, 2 * top_k * len(bases)) columns to project activations on, for several comparisons.

    ``layers``: the cached layers the table's rows stand for (a count n means 0..n-1; a capture with
    ``--layers`` keeps some only: bases of other layers are left out). Comparison i owns columns
    [2i top_k, (2i+1) top_k) for V_k of its dW and the next top_k for the random baseline subspace of
    equal dimension; unused columns are zero (they add no energy).
    """
    layers = list(range(layers)) if isinstance(layers, int) else list(layers)
    row = {layer: index for index, layer in enumerate(layers)}
    table = np.zeros((len(layers), hidden, 2 * top_k * len(bases)))
    for i, per_layer in enumerate(bases):
        for layer, (basis, _, _) in per_layer.items():
            if layer not in row:
                continue
            k = basis.shape[1]
            table[row[layer], :, 2 * i * top_k:2 * i * top_k + k] = basis
            table[row[layer], :, (2 * i + 1) * top_k:(2 * i + 1) * top_k + k] = random_subspace(hidden, k, seed,
                                                                                                 layer)
    return table


def shares_from_energy(energy: np.ndarray, total: np.ndarray, index: int, top_k: int) -> list[tuple[float, float]]:
    """Per layer ``(share in V_k, share in the random subspace)`` of comparison ``index`` in a table."""
    start = 2 * index * top_k
    in_update = energy[:, start:start + top_k].sum(axis=1)
    in_random = energy[:, start + top_k:start + 2 * top_k].sum(axis=1)
    return [(float(u / t), float(r / t)) if t > 0 else (float("nan"), float("nan"))
            for u, r, t in zip(in_update, in_random, total)]


def update_bases(checkpoint_a, checkpoint_b, top_k: int, map_layers=map,
                 layers=None) -> dict[int, tuple[np.ndarray, int, list[str]]]:
    """Per block: ``(V_k, rank of dW, matrix names)`` of the MLP input-side update between two checkpoints
    (``layers``: only these blocks, those whose MLP inputs a cache holds; default all)."""
    names = mlp_input_names(checkpoint_a, checkpoint_a.family)
    if not names:
        raise UserError(f"found no MLP input matrices (up/gate) in {getattr(checkpoint_a, 'path', 'the checkpoint')}")
    def one(layer: int) -> tuple[np.ndarray, int, list[str]]:
        basis, rank = top_right_singular(update_gram(checkpoint_a, checkpoint_b, names[layer]), top_k)
        return basis, rank, names[layer]

    layers = [layer for layer in names if layers is None or layer in layers]
    return dict(zip(layers, map_layers(one, layers)))


def top_left_singular(gram: np.ndarray, top_k: int, tolerance: float = 1e-6) -> tuple[np.ndarray, int]:
    """``(U_k, rank)`` of dW from dW dW^T: the same eigen-decomposition as ``top_right_singular``."""
    return top_right_singular(gram, top_k, tolerance)


def column_bases(checkpoint_a, checkpoint_b, top_k: int, map_layers=map,
                 layers=None) -> dict[int, tuple[np.ndarray, int, list[str]]]:
    """Per block whose stream-writing matrices changed: ``(U_k, rank, names)`` of their stacked update.

    U_k (hidden x k) spans the residual directions the update writes; blocks whose writing
    matrices did not change are left out (no row of that kind). ``layers``: only these blocks
    (those whose output ``resid[l + 1]`` a cache holds; default all).
    """
    names = stream_write_names(checkpoint_a, checkpoint_a.family)

    def one(layer: int) -> tuple[np.ndarray, int, list[str]]:
        basis, rank = top_left_singular(update_gram(checkpoint_a, checkpoint_b, names[layer], side="column"), top_k)
        return basis, rank, names[layer]

    layers = [layer for layer in names if layers is None or layer in layers]
    found = dict(zip(layers, map_layers(one, layers)))
    return {layer: value for layer, value in found.items() if value[1] > 0}
