"""Direction ablation: remove the directions along which unlearning moved the residual stream.

The directions come from the two activation caches (``analyses/activations/attack_directions.py``, no extra
forward pass), fitted as Lucki et al. 2024 fit theirs (ethz-spylab/unlearning-vs-safety,
``src/orthogonalization/orthogonalization.py``): position 0 (the attention sink) and outlier tokens
left out, and only on forget texts that the forget NLL does not measure (the cache samples of the
attack pool; the measured half is ``relearn.split_measure_pool``'s). For layer l and k, the
subspace V is the difference-in-means direction (k = 1) or the span of it and the top k-1
principal directions of the per-token difference (orthonormalised, so the k subspaces are nested).
Each is removed, ``h <- h - V V^T h``, from the modified model and, as the control, from the base:

- ``single``: at residual layer l only (the embedding output for l = 0, else block l's output);
- ``per_layer``: every block's output loses *its own layer's* subspace (Lucki et al.'s
  orthogonalization with ``--layers all``: one hook per decoder layer, each with that layer's
  direction); layers without a difference are left alone;
- ``all``: one layer's subspace removed from the embedding output, every attention and MLP
  output and every block's output (Arditi et al. 2024's "directional ablation", hooks as in
  andyrdt/refusal_direction);
- ``orthogonalize``: the same removal baked into the weights: every matrix that writes into the
  stream (embeddings, attention output and MLP down projections, in (out, in) orientation:
  ``W <- W - V V^T W``, their biases ``b <- b - V V^T b``), as in andyrdt/refusal_direction
  (``get_orthogonalized_matrix``). A tied unembedding is untied first so that only what is
  written into the stream changes. With every write in the complement of V the stream stays
  there, so this equals ``all`` (a test checks it).

Layers are ranked by ``relative_norm``: the mean difference's norm over the base residual's RMS
norm at that layer (residual norms grow with depth, so the raw norm would favour the last
layers). Default settings keep a run cheap: ``single`` at a handful of layers (the two with the
largest relative norm plus three spread over depth) for k in (1, 4), ``per_layer`` for k in
(1, 4), and ``orthogonalize`` at the layer with the largest relative norm (``all`` computes the
same function, so it runs only when asked for; at that layer too). Each setting costs one
evaluation per target.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from unlearn_lens.attacks.base import AttackContext, AttackResult, timed
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import check_at_least

MODES = ("single", "per_layer", "all", "orthogonalize")
#: option -> default (``--option KEY=VALUE`` on the command line).
ATTACK_OPTIONS: dict[str, Any] = {
    "ablate_k": (1, 4),  # subspace sizes
    "ablate_layers": None,  # residual layers (0 = embedding output); None = chosen as described above
    "ablate_modes": ("single", "per_layer", "orthogonalize"),  # "all" computes what "orthogonalize" does (tested)
    "ablate_top_layers": 2,  # default layers: this many with the largest relative mean difference ...
    "ablate_spread_layers": 3,  # ... plus this many spread evenly over depth
    "ablate_kmax": 4,  # principal directions saved in directions.npz
    "ablate_skip_positions": 1,  # leading positions of each text left out of the fit (0 = the attention sink)
    "ablate_drop_outliers": True,  # leave Lucki et al.'s outlier tokens (z > 3) out of the fit
}
#: A layer whose mean difference is below this norm has no direction to remove (before the change).
MIN_NORM = 1e-8


# --- subspaces (numpy) ----------------------------------------------------------------------

def subspace(directions: dict[str, np.ndarray], layer: int, k: int) -> np.ndarray:
    """(k, hidden) orthonormal rows: the mean difference, then the top principal directions."""
    mean = directions["mean_diff"][layer].astype(np.float64)
    if np.linalg.norm(mean) < MIN_NORM:
        raise ValueError(f"layer {layer}: no mean difference to ablate")
    pcs = directions["pcs"][layer].astype(np.float64)
    if k - 1 > len(pcs):
        raise UserError(f"ablate_k={k} needs {k - 1} principal directions; directions.npz holds {len(pcs)} "
                        "(raise ablate_kmax)")
    stacked = np.vstack([mean[None, :], pcs[: k - 1]])
    q, r = np.linalg.qr(stacked.T)
    keep = np.abs(np.diag(r)) > 1e-6 * np.abs(r[0, 0])  # drop a PC that the mean difference already spans
    return (q[:, keep] * np.sign(np.diag(r)[keep])).T


def layer_scores(directions: dict[str, np.ndarray]) -> np.ndarray:
    """Per layer, the mean difference's norm relative to the base residual's RMS norm (0 without a difference)."""
    norms = np.linalg.norm(directions["mean_diff"].astype(np.float64), axis=1)
    relative = np.nan_to_num(np.asarray(directions["relative_norm"], dtype=np.float64), nan=0.0)
    return np.where(norms >= MIN_NORM, relative, 0.0)


def chosen_layer(directions: dict[str, np.ndarray]) -> int | None:
    """The layer with the largest relative mean difference (None when no layer differs)."""
    scores = layer_scores(directions)
    return int(np.argmax(scores)) if scores.max(initial=0.0) > 0 else None


def default_layers(directions: dict[str, np.ndarray], top: int, spread: int) -> list[int]:
    """The ``top`` layers with the largest relative mean difference plus ``spread`` layers evenly over depth."""
    norms = np.linalg.norm(directions["mean_diff"].astype(np.float64), axis=1)
    scores = layer_scores(directions)
    candidates = [int(i) for i in np.flatnonzero(norms >= MIN_NORM)]
    if not candidates:
        return []
    chosen = set(sorted(candidates, key=lambda i: -scores[i])[:top])
    if spread > 0:
        picks = np.linspace(0, len(candidates) - 1, spread + 2)[1:-1] if spread < len(candidates) else \
            np.arange(len(candidates))
        chosen |= {candidates[int(round(p))] for p in picks}
    return sorted(chosen)


# --- model side -----------------------------------------------------------------------------

def _project(hidden, basis):
    """``h - (h V) V^T`` in float32, returned in ``h``'s dtype."""
    v = basis.to(device=hidden.device)
    h = hidden.float()
    return (h - (h @ v.T) @ v).to(hidden.dtype)


def _output_hook(basis):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (_project(output[0], basis), *output[1:])
        return _project(output, basis)
    return hook


def _input_hook(basis):
    def hook(module, args, kwargs):
        if args:
            return (_project(args[0], basis), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _project(kwargs["hidden_states"], basis)}
    return hook


@contextlib.contextmanager
def ablated(model, basis: np.ndarray, layers: Sequence[int], components: bool = False) -> Iterator[None]:
    """Hooks removing span(``basis`` rows) from the given residual layers (0 = embedding output).

    ``components`` also removes it from every attention and MLP output (Arditi et al.'s directional
    ablation hooks), so that the residual between a block's attention and MLP (Llama, GPT-2) is
    ablated too: with the embedding output, that is every write into the stream.
    """
    with ablated_per_layer(model, {layer: basis for layer in layers}, components=basis if components else None):
        yield


@contextlib.contextmanager
def ablated_per_layer(model, bases: Mapping[int, np.ndarray], components: np.ndarray | None = None) -> Iterator[None]:
    """Hooks removing span(``bases[l]`` rows) from residual layer l, each layer its own subspace.

    ``components``: a basis also removed from every attention and MLP output (see ``ablated``).
    """
    import torch

    from unlearn_lens.architectures import ArchitectureAdapter

    adapter = ArchitectureAdapter(model)

    def tensor(basis: np.ndarray):
        return torch.as_tensor(np.asarray(basis), dtype=torch.float32)

    handles = []
    try:
        for layer, basis in bases.items():
            if layer == 0:  # the embedding output is block 0's input (position embeddings included)
                handles.append(adapter.block(0).register_forward_pre_hook(_input_hook(tensor(basis)), with_kwargs=True))
            else:
                handles.append(adapter.block(layer - 1).register_forward_hook(_output_hook(tensor(basis))))
        if components is not None:
            v = tensor(components)
            for index in range(adapter.num_layers):
                handles.append(adapter.attn(index).register_forward_hook(_output_hook(v)))
                handles.append(adapter.mlp(index).register_forward_hook(_output_hook(v)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def per_layer_bases(directions: dict[str, np.ndarray], k: int) -> dict[int, np.ndarray]:
    """Each block output's own k-subspace (residual layers 1..L, as the reference hooks the decoder
    layers), for the layers whose mean difference is not zero."""
    norms = np.linalg.norm(directions["mean_diff"].astype(np.float64), axis=1)
    return {int(layer): subspace(directions, int(layer), k) for layer in directions["layers"][1:]
            if norms[layer] >= MIN_NORM}


def all_layers(model) -> list[int]:
    from unlearn_lens.architectures import ArchitectureAdapter

    return list(range(ArchitectureAdapter(model).num_layers + 1))


def orthogonalize(model, basis: np.ndarray) -> list[str]:
    """Remove span(``basis`` rows) from every parameter that writes into the residual stream, in place.

    Returns the names changed. A tied unembedding is untied first (the read side stays as it was).
    """
    import torch

    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.core.naming import is_transposed

    adapter = ArchitectureAdapter(model)
    unembed = adapter.unembed()
    embed = adapter.embed()
    if unembed.weight is embed.weight or unembed.weight.data_ptr() == embed.weight.data_ptr():
        unembed.weight = torch.nn.Parameter(unembed.weight.detach().clone())
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    changed = []
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in adapter.parameter_names(roles={"out", "down", "embed", "pos_embed"}):
            param = params[name]
            info = adapter.classify(name)
            if info.layer < 0 and not name.endswith(".weight"):
                continue
            v = torch.as_tensor(np.asarray(basis), dtype=torch.float32, device=param.device)
            w = param.data.float()
            if w.ndim == 1 or info.role in ("embed", "pos_embed") or is_transposed(name, adapter.family):
                w = w - (w @ v.T) @ v  # rows are hidden vectors: biases, embeddings, Conv1D (in, out)
            else:
                w = w - v.T @ (v @ w)  # (out = hidden, in)
            param.data.copy_(w.to(param.dtype))
            changed.append(name)
    return changed


def fit_samples(ctx: AttackContext, cache_url: str) -> list[int]:
    """The cache's forget samples whose text the forget NLL does not measure (the attack pool).

    The cache holds the first N texts of ``forget.txt`` (one sample per text, file order); the
    measured half is ``split_measure_pool``'s. Refuses a cache captured from other data, whose
    samples cannot be matched to texts, and one holding no pool text.
    """
    from cache_store import open_cache
    from unlearn_lens import data as data_module
    from unlearn_lens.relearn import split_measure_pool

    ds = open_cache(str(cache_url), "forget")
    expected = data_module.data_hash(ctx.settings.data, echo=ctx.progress)
    if ds.attrs.get("data_manifest_hash") != expected:
        raise UserError(f"ablate: {cache_url} was captured from other data than {ctx.settings.data} (data hash "
                        f"{str(ds.attrs.get('data_manifest_hash'))[:12]} vs {expected[:12]}): its forget texts cannot "
                        "be told from the measured ones; capture it from this --data")
    texts = ctx.data.all_forget[: ds.sizes["sample"]]
    measured = set(split_measure_pool(ctx.data.all_forget)[0])
    samples = [i for i, text in enumerate(texts) if text not in measured]
    if not samples:
        raise UserError(f"ablate: the {len(texts)} forget texts in {cache_url} are all measured by the forget NLL; "
                        "the directions are fitted on the others: capture more forget texts (capture --max-samples)")
    return samples


def _directions(ctx: AttackContext, caches: tuple[str, str]) -> dict[str, np.ndarray]:
    from analyses.activations.attack_directions import DIRECTIONS_FILE, compute_and_save, load_directions
    from analyses.io import atomic_write_json

    path = ctx.attack_dir / DIRECTIONS_FILE
    sources_path = ctx.attack_dir / "directions_sources.json"
    kmax = int(ctx.option("ablate_kmax", ATTACK_OPTIONS["ablate_kmax"]))
    skip = int(ctx.option("ablate_skip_positions", ATTACK_OPTIONS["ablate_skip_positions"]))
    outliers = bool(ctx.option("ablate_drop_outliers", ATTACK_OPTIONS["ablate_drop_outliers"]))
    check_at_least("ablate_skip_positions", skip, 0)
    samples = fit_samples(ctx, caches[0])
    sources = {"cache_base": str(caches[0]), "cache_model": str(caches[1]), "base": ctx.settings.base,
               "model": ctx.settings.model, "skip_positions": skip, "drop_outliers": outliers,
               "fit_samples": samples, "version": 2}
    stale = not sources_path.is_file() or json.loads(sources_path.read_text()) != sources
    if ctx.settings.force or stale or not path.is_file() or load_directions(path)["pcs"].shape[1] < kmax:
        ctx.progress(f"ablate: directions from the caches ({len(samples)} unmeasured forget texts, positions "
                     f"from {skip}{', outlier tokens left out' if outliers else ''})")
        s = ctx.settings
        specs = {}
        try:
            from analyses.weights.checkpoints import open_checkpoint

            open_checkpoint(s.base, s.base_revision), open_checkpoint(s.model, s.model_revision)
            specs = {"base_spec": s.base, "model_spec": s.model, "base_revision": s.base_revision,
                     "model_revision": s.model_revision}
        except UserError as exc:
            ctx.progress(f"ablate: write-space shares left NaN (checkpoints not readable: {exc})")
        compute_and_save(caches[0], caches[1], ctx.attack_dir, kmax=kmax, samples=samples, skip=skip,
                         drop_outliers=outliers, **specs)
        atomic_write_json(sources_path, sources)
    return load_directions(path)


#: One ablation setting: (mode, residual layer or None for ``per_layer``, k).
Setting = tuple[str, int | None, int]


def plan(directions: dict[str, np.ndarray], options: dict) -> list[Setting]:
    """(mode, layer, k) settings to run, from the options (see ``ATTACK_OPTIONS``)."""
    ks = [int(k) for k in _as_tuple(options.get("ablate_k", ATTACK_OPTIONS["ablate_k"]))]
    modes = [str(m) for m in _as_tuple(options.get("ablate_modes", ATTACK_OPTIONS["ablate_modes"]))]
    bad = [m for m in modes if m not in MODES]
    if bad or any(k < 1 for k in ks):
        raise UserError(f"ablate: modes must be among {', '.join(MODES)} and k at least 1 (got {modes}, {ks})")
    n_layers = len(directions["layers"])
    norms = np.linalg.norm(directions["mean_diff"].astype(np.float64), axis=1)
    scores = layer_scores(directions)
    given = options.get("ablate_layers", ATTACK_OPTIONS["ablate_layers"])
    if given is not None:
        layers = [int(x) for x in _as_tuple(given)]
        if any(not 0 <= x < n_layers for x in layers):
            raise UserError(f"ablate_layers must be between 0 and {n_layers - 1}, got {layers}")
    else:
        layers = default_layers(directions, int(options.get("ablate_top_layers", ATTACK_OPTIONS["ablate_top_layers"])),
                                int(options.get("ablate_spread_layers", ATTACK_OPTIONS["ablate_spread_layers"])))
    layers = [x for x in layers if norms[x] >= MIN_NORM]
    if not layers:
        return []
    top = max(layers, key=lambda x: scores[x])
    settings: list[Setting] = [("single", layer, k) for layer in layers for k in ks if "single" in modes]
    if "per_layer" in modes and norms[1:].max(initial=0.0) >= MIN_NORM:
        settings += [("per_layer", None, k) for k in ks]
    settings += [(mode, top, k) for mode in ("all", "orthogonalize") if mode in modes for k in ks]
    return settings


def _as_tuple(value) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return (value,)


def run(ctx: AttackContext) -> Iterable[AttackResult]:
    """Every planned (mode, layer, k) on the modified model and on the base (control)."""
    caches = (ctx.settings.cache_base, ctx.settings.cache_model)
    if not all(caches):
        raise UserError("ablate needs the activation caches of both models (--cache-base / --cache-model)")
    directions = _directions(ctx, caches)
    settings = plan(directions, ctx.settings.options)
    if not settings:
        ctx.progress("ablate: the caches show no difference between the models; nothing to ablate")
        return []
    results = []
    for target, which in (("modified", "modified"), ("control", "base")):
        model, tokenizer = ctx.load(which)
        for mode, layer, k in settings:
            if mode == "per_layer":
                bases = per_layer_bases(directions, k)
                setting, rank = f"layers=all,k={k},mode={mode}", max(int(b.shape[0]) for b in bases.values())
            else:
                basis = subspace(directions, layer, k)
                setting, rank = f"layer={layer},k={k},mode={mode}", int(basis.shape[0])
            ctx.progress(f"ablate {target}: {setting}")
            if mode == "orthogonalize":
                fresh, fresh_tokenizer = ctx.load(which)
                orthogonalize(fresh, basis)
                metrics, seconds = timed(lambda: ctx.evaluate(fresh, fresh_tokenizer))
                del fresh
            else:
                hooks = ablated_per_layer(model, bases) if mode == "per_layer" else \
                    ablated(model, basis, [layer] if mode == "single" else all_layers(model), components=mode == "all")
                with hooks:
                    metrics, seconds = timed(lambda: ctx.evaluate(model, tokenizer))
            results.append(AttackResult("ablate", setting, target, metrics, seconds,
                                        extra={"layer": layer, "k": k, "mode": mode, "rank": rank}))
        del model
    return results
