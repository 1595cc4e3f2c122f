"""Local Lipschitz estimates of a causal LM around forget and retain texts.

Did the intervention make the model more or less sensitive to small input changes? For every
text we perturb the input embeddings (``inputs_embeds``) and measure how far the outputs move.

Perturbation (the one definition used everywhere): every real token's embedding ``e_t`` gets
``delta_t = eps * ||e_t|| * u_t`` with ``u_t`` a random unit direction (Gaussian, normalised),
i.e. the ball radius is *relative* to the token's own embedding norm, so one ``eps`` means the
same thing for models whose embedding scales differ. Padding is never perturbed and never
counted. Directions depend only on ``(seed, split, text index, draw)``, so the base and the
modified model see exactly the same perturbations (a paired comparison), and results do not
depend on the batch size.

Per text and draw, the Lipschitz ratio is ``||f(e + delta) - f(e)||_F / ||delta||_F`` over the
text's real tokens (the sequence map's local ratio), with ``f`` the final hidden state (output
of the last block, before the final norm, the cache's layer L) or the logits. Also reported:
the norm of the gradient of the text's mean next-token NLL with respect to its input embeddings,
and the variance of the logits across draws (per token and vocabulary entry, averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.identity import inputs_record
from unlearn_lens.core.limits import check_at_least, check_counts
from unlearn_lens.core.settings import DEFAULT_SEED, SHORT_MAX_LENGTH, Compute, ModelRef

#: ``forward(inputs_embeds (B,T,d), attention_mask (B,T)) -> (hidden (B,T,h), logits (B,T,V))``
ForwardFn = Callable[[Any, Any], tuple[Any, Any]]

METRICS = ("lipschitz_hidden_mean", "lipschitz_hidden_max", "lipschitz_logits_mean",
           "lipschitz_logits_max", "grad_norm_mean", "output_variance_mean")
CSV_COLUMNS = ("model", "split") + ("eps",) + METRICS + ("n_texts",)
SPLIT_CODES = {"forget": 0, "retain": 1}
EPS_DEFINITION = ("relative: each real token's embedding e_t is moved by eps * ||e_t|| along a random "
                  "unit direction; padding is never perturbed")


# --- tokenisation and batching (shared with the tuned lens) ---------------------------------

def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (the tokenizer's own special tokens), truncated to ``max_length``."""
    return [list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]) for text in texts]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ``(input_ids, attention_mask)`` long tensors of a list of id lists."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def batched(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """``(start, chunk)`` pairs of consecutive chunks of ``size`` items."""
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


# --- perturbations ---------------------------------------------------------------------------

def unit_directions(num_tokens: int, hidden: int, n_perturb: int, *, seed: int, split: str,
                    text_index: int):
    """``(n_perturb, num_tokens, hidden)`` float32 unit vectors (per token), fixed by the seed."""
    import torch

    state = np.random.SeedSequence([int(seed), SPLIT_CODES.get(split, 2), int(text_index)]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    u = torch.randn((n_perturb, num_tokens, hidden), generator=generator, dtype=torch.float32)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def scaled_perturbation(embeds, mask, directions, eps: float):
    """``eps * ||e_t|| * u_t`` at real tokens, zero at padding (same shape as ``embeds``)."""
    scale = eps * embeds.norm(dim=-1, keepdim=True) * mask[..., None].to(embeds.dtype)
    return directions.to(embeds.dtype) * scale


def _safe_ratio(numerator, denominator):
    import torch

    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))


@dataclass
class BatchStats:
    """Per-text statistics of one batch at one eps (numpy, leading axis = text)."""

    lipschitz_hidden: np.ndarray  # (B, n_perturb)
    lipschitz_logits: np.ndarray  # (B, n_perturb)
    output_variance: np.ndarray  # (B,)


def perturbation_stats(forward: ForwardFn, embeds, mask, directions, eps: float) -> BatchStats:
    """Lipschitz ratios and output variance of one padded batch under ``n_perturb`` draws.

    ``directions``: (n_perturb, B, T, d) unit directions (padding rows are ignored).
    """
    import torch

    with torch.no_grad():
        real = mask[..., None].to(torch.float32)
        clean_hidden, clean_logits = (x.float() for x in forward(embeds, mask))
        n_perturb = directions.shape[0]
        batch = embeds.shape[0]
        lip_hidden = torch.zeros((batch, n_perturb), dtype=torch.float64)
        lip_logits = torch.zeros((batch, n_perturb), dtype=torch.float64)
        sum_diff = torch.zeros_like(clean_logits)
        sum_sq = torch.zeros(batch, dtype=torch.float64)
        for k in range(n_perturb):
            delta = scaled_perturbation(embeds, mask, directions[k].to(embeds.device), eps)
            hidden, logits = (x.float() for x in forward(embeds + delta, mask))
            d_hidden = (hidden - clean_hidden) * real
            d_logits = (logits - clean_logits) * real
            delta_norm = delta.float().flatten(1).norm(dim=1).double().cpu()
            lip_hidden[:, k] = _safe_ratio(d_hidden.flatten(1).norm(dim=1).double().cpu(), delta_norm)
            lip_logits[:, k] = _safe_ratio(d_logits.flatten(1).norm(dim=1).double().cpu(), delta_norm)
            sum_diff += d_logits
            sum_sq += d_logits.double().pow(2).flatten(1).sum(dim=1).cpu()
        # variance across draws, shifted by the clean output for accuracy: E[d^2] - E[d]^2
        mean_sq = sum_sq / n_perturb
        sq_mean = (sum_diff.double() / n_perturb).pow(2).flatten(1).sum(dim=1).cpu()
        cells = mask.sum(dim=1).double().cpu() * clean_logits.shape[-1]
        variance = ((mean_sq - sq_mean).clamp_min(0.0) / cells.clamp_min(1.0))
    return BatchStats(lip_hidden.numpy(), lip_logits.numpy(), variance.numpy())


def input_gradient_norms(forward: ForwardFn, embeds, mask, input_ids) -> np.ndarray:
    """Per text, ``||d mean-NLL / d inputs_embeds||_F`` over its real tokens (NaN if < 2 tokens)."""
    import torch
    import torch.nn.functional as F

    x = embeds.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        _, logits = forward(x, mask)
        logits = logits[:, :-1].float()
        targets = input_ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).to(torch.float32)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="none").view_as(valid)
        counts = valid.sum(dim=1)
        per_text = (nll * valid).sum(dim=1) / counts.clamp_min(1.0)
        (gradient,) = torch.autograd.grad(per_text.sum(), x)
    norms = (gradient.float() * mask[..., None]).flatten(1).norm(dim=1).double().cpu().numpy()
    norms[(counts == 0).cpu().numpy()] = np.nan
    return norms


# --- a model as a forward function -------------------------------------------------------------

def model_forward_fn(model, adapter) -> ForwardFn:
    """Forward function of an HF causal LM: last block output (before the final norm) and logits."""
    last_block = adapter.block(adapter.num_layers - 1)

    def forward(embeds, mask):
        store: dict[str, Any] = {}

        def hook(_module, _args, output):
            store["hidden"] = output[0] if isinstance(output, (tuple, list)) else output

        handle = last_block.register_forward_hook(hook)
        try:
            out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        finally:
            handle.remove()
        return store["hidden"], out.logits

    return forward


# --- one model over the splits -----------------------------------------------------------------

def split_results(forward: ForwardFn, embed, tokenized: Sequence[Sequence[int]], *, split: str,
                  eps_values: Sequence[float], n_perturb: int, batch_size: int, seed: int, pad_id: int,
                  device: str = "cpu", progress=None) -> list[dict]:
    """Rows (split, eps, metrics, n_texts) of one model on one split's tokenised texts.

    ``embed`` maps input ids (B,T) to input embeddings (B,T,d).
    """
    import torch

    if not tokenized:
        raise UserError(f"the {split} split has no texts")
    lip_hidden: dict[float, list] = {eps: [] for eps in eps_values}
    lip_logits: dict[float, list] = {eps: [] for eps in eps_values}
    variance: dict[float, list] = {eps: [] for eps in eps_values}
    grad_norms = []
    for start, chunk in batched(list(tokenized), batch_size):
        input_ids, mask = pad_batch(chunk, pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.no_grad():
            embeds = embed(input_ids)
        hidden = embeds.shape[-1]
        directions = torch.zeros((n_perturb,) + tuple(embeds.shape), dtype=torch.float32)
        for row, sequence in enumerate(chunk):
            directions[:, row, : len(sequence)] = unit_directions(
                len(sequence), hidden, n_perturb, seed=seed, split=split, text_index=start + row)
        grad_norms.append(input_gradient_norms(forward, embeds, mask, input_ids))
        for eps in eps_values:
            stats = perturbation_stats(forward, embeds, mask, directions, eps)
            lip_hidden[eps].append(stats.lipschitz_hidden)
            lip_logits[eps].append(stats.lipschitz_logits)
            variance[eps].append(stats.output_variance)
            if progress is not None:
                progress.update(len(chunk))
    grads = np.concatenate(grad_norms)
    grad_mean = float(np.nanmean(grads)) if np.isfinite(grads).any() else math.nan
    rows = []
    for eps in eps_values:
        hid, log = np.concatenate(lip_hidden[eps]), np.concatenate(lip_logits[eps])
        rows.append({
            "split": split, "eps": float(eps),
            "lipschitz_hidden_mean": float(hid.mean()), "lipschitz_hidden_max": float(hid.max()),
            "lipschitz_logits_mean": float(log.mean()), "lipschitz_logits_max": float(log.max()),
            "grad_norm_mean": grad_mean,
            "output_variance_mean": float(np.concatenate(variance[eps]).mean()),
            "n_texts": len(tokenized),
        })
    return rows


def check_shared_tokenizer(tokenizer_a, tokenizer_b) -> None:
    """Both models must tokenise identically (same vocabulary), else a UserError."""
    if tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise UserError("the two models do not share a tokenizer (vocabularies differ); "
                        "compare a model with variants of itself")


def check_same_embedding_shape(shape_a: Sequence[int], shape_b: Sequence[int]) -> None:
    """The perturbations are paired, so both embedding matrices must have the same shape."""
    if tuple(shape_a) != tuple(shape_b):
        raise UserError(f"the two models' embedding matrices differ in shape ({tuple(shape_a)} vs "
                        f"{tuple(shape_b)}); compare a model with variants of itself")


# --- summary -----------------------------------------------------------------------------------

def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0 or not math.isfinite(denominator) or not math.isfinite(numerator):
        return math.nan
    return numerator / denominator


def summarise(rows: Sequence[dict], name_a: str, name_b: str) -> dict:
    """Forget/retain ratio per model and modified/base ratio per split, for every eps and metric."""
    index = {(r["model"], r["split"], r["eps"]): r for r in rows}
    eps_values = sorted({r["eps"] for r in rows})
    forget_over_retain = {
        model: {str(eps): {m: _ratio(index[(model, "forget", eps)][m], index[(model, "retain", eps)][m])
                           for m in METRICS}
                for eps in eps_values}
        for model in (name_a, name_b)
    }
    modified_over_base = {
        split: {str(eps): {m: _ratio(index[(name_b, split, eps)][m], index[(name_a, split, eps)][m])
                           for m in METRICS}
                for eps in eps_values}
        for split in ("forget", "retain")
    }
    return {"base": name_a, "modified": name_b, "eps_definition": EPS_DEFINITION,
            "forget_over_retain": forget_over_retain, "modified_over_base": modified_over_base}


def plot_results(rows: Sequence[dict], name_a: str, name_b: str, path) -> None:
    """Grouped bars per eps: forget vs retain (colour) and base vs modified (hatching)."""
    from analyses.io import atomic_save_figure
    from analyses.plotting import subplots

    eps_values = sorted({r["eps"] for r in rows})
    index = {(r["model"], r["split"], r["eps"]): r for r in rows}
    panels = [("lipschitz_hidden_mean", "Lipschitz ratio, final hidden state"),
              ("lipschitz_logits_mean", "Lipschitz ratio, logits"),
              ("grad_norm_mean", "||grad of NLL wrt input embeddings||"),
              ("output_variance_mean", "logit variance under perturbation")]
    combos = [(name_a, "forget"), (name_a, "retain"), (name_b, "forget"), (name_b, "retain")]
    colours = {"forget": "tab:red", "retain": "tab:blue"}
    figure, axes = subplots(2, 2, figsize=(11, 8))
    width = 0.8 / len(combos)
    x = np.arange(len(eps_values))
    for ax, (metric, label) in zip(axes.flat, panels):
        for j, (model, split) in enumerate(combos):
            values = [index[(model, split, eps)][metric] for eps in eps_values]
            ax.bar(x + (j - 1.5) * width, values, width, color=colours[split],
                   hatch="//" if model == name_b else None, edgecolor="black", linewidth=0.5,
                   label=f"{model} / {split}")
        if metric == "output_variance_mean" and all(r[metric] > 0 for r in rows):
            ax.set_yscale("log")  # the variance grows like eps^2
        ax.set_xticks(x, [f"{eps:g}" for eps in eps_values])
        ax.set_xlabel("eps (relative to each token's embedding norm)")
        ax.set_ylabel(label)
        ax.set_title(label)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(f"Local Lipschitz: {name_a} vs {name_b}, forget vs retain")
    figure.tight_layout()
    atomic_save_figure(figure, path)


# --- the whole step ----------------------------------------------------------------------------

def validate_options(*, eps_values: Sequence[float], n_perturb: int, batch_size: int, max_length: int,
                     max_samples: int | None) -> None:
    """One-line errors for option values that cannot work."""
    if not eps_values:
        raise UserError("--eps needs at least one value")
    bad = [eps for eps in eps_values if not (eps > 0 and math.isfinite(eps))]
    if bad:
        raise UserError(f"--eps values must be positive and finite, got {', '.join(map(str, bad))}")
    check_at_least("--n-perturb", n_perturb, 2, "the output variance needs two draws")
    check_counts(batch_size=batch_size, max_length=max_length, max_samples=max_samples)


def model_rows(spec: str, name: str, texts: dict[str, list[str]], *, eps_values: Sequence[float],
               n_perturb: int, max_length: int, batch_size: int, seed: int, device: str, dtype: str,
               revision: str | None = None, arch_spec=None, trust_remote_code: bool = False,
               reference_shape=None):
    """Load one model and compute its rows for every split; returns ``(rows, embedding_shape)``."""
    import torch
    from tqdm.auto import tqdm

    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.loading import load_model

    model, tokenizer = load_model(spec, revision=revision, dtype=dtype, device=device,
                                  trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    embedding = model.get_input_embeddings()
    shape = tuple(embedding.weight.shape)
    if reference_shape is not None:
        check_same_embedding_shape(reference_shape, shape)
    forward = model_forward_fn(model, ArchitectureAdapter(model, arch_spec))
    rows = []
    total = sum(len(v) for v in texts.values()) * len(eps_values)
    with tqdm(total=total, desc=f"lipschitz {name}", unit="text") as progress:
        for split, split_texts in texts.items():
            tokenized = [ids for ids in tokenize_texts(tokenizer, split_texts, max_length)]
            if not any(len(ids) for ids in tokenized):
                raise UserError(f"the {split} texts tokenise to nothing")
            tokenized = [ids if ids else [tokenizer.eos_token_id] for ids in tokenized]
            for row in split_results(forward, embedding, tokenized, split=split, eps_values=eps_values,
                                     n_perturb=n_perturb, batch_size=batch_size, seed=seed,
                                     pad_id=tokenizer.pad_token_id, device=device, progress=progress):
                rows.append({"model": name, **row})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, shape


#: Defaults of the Lipschitz step: radii, draws per text and eps, texts per split, and float32
#: (half precision swamps the small perturbations).
DEFAULT_EPS_TEXT = "1e-3,1e-2"  # as the --eps flag shows it
DEFAULT_EPS = tuple(float(eps) for eps in DEFAULT_EPS_TEXT.split(","))
DEFAULT_N_PERTURB = 8
LIPSCHITZ_MAX_SAMPLES = 64
LIPSCHITZ_DTYPE = "float32"


def parse_eps(text: str) -> list[float]:
    """``"1e-3,1e-2"`` -> ``[0.001, 0.01]``; a clear error for anything else."""
    values = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise UserError(f"--eps: {part.strip()!r} is not a number (give e.g. 1e-3,1e-2)") from None
    return values


@dataclass(frozen=True)
class LipschitzSettings:
    """Everything ``run_lipschitz`` needs (the `lipschitz` command's flags)."""

    model_a: ModelRef  # the base model
    model_b: ModelRef  # the modified model, same tokenizer and embedding shape
    data: str
    outdir: str
    name_a: str = "base"
    name_b: str | None = None  # default: derived from model_b.spec
    eps_values: tuple[float, ...] = DEFAULT_EPS
    n_perturb: int = DEFAULT_N_PERTURB
    max_samples: int | None = LIPSCHITZ_MAX_SAMPLES
    max_length: int = SHORT_MAX_LENGTH
    compute: Compute = Compute(dtype=LIPSCHITZ_DTYPE)
    seed: int = DEFAULT_SEED
    overwrite: bool = False


def run_lipschitz(settings: LipschitzSettings) -> Path:
    """Write ``OUT/<name_a>__to__<name_b>/lipschitzness/`` (CSV, summary.json, plot, marker).

    Returns the output folder. A finished folder is left alone unless ``overwrite``.
    """
    from analyses.io import atomic_write_csv, atomic_write_json, clear_complete, is_complete, mark_complete
    from unlearn_lens.data import read_texts
    from unlearn_lens.loading import load_tokenizer

    s = settings
    a, b = s.model_a, s.model_b
    model_a, model_b, revision_a, revision_b = a.spec, b.spec, a.revision, b.revision
    name_a, name_b = s.name_a, s.name_b or outputs.default_name(b.spec)
    data_dir, outdir, eps_values, n_perturb, max_samples = s.data, s.outdir, s.eps_values, s.n_perturb, s.max_samples
    max_length, batch_size, seed, device, dtype = (s.max_length, s.compute.batch_size, s.seed, s.compute.device,
                                                   s.compute.dtype)
    overwrite = s.overwrite
    validate_options(eps_values=eps_values, n_perturb=n_perturb, batch_size=batch_size,
                     max_length=max_length, max_samples=max_samples)
    outputs.check_model_name(name_a, "--name-a"), outputs.check_model_name(name_b, "--name-b")
    if name_a == name_b:
        raise UserError(f"--name-a and --name-b are both {name_a!r}; give the models different names")
    folder = outputs.comparison_dir(outdir, name_a, name_b) / outputs.LIPSCHITZ
    inputs = inputs_record(models=[("model_a", model_a, revision_a), ("model_b", model_b, revision_b)],
                           data=data_dir, settings=settings)
    if is_complete(folder, inputs) and not overwrite:
        return folder
    texts = {split: read_texts(data_dir, split)[: max_samples or None] for split in ("forget", "retain")}
    check_shared_tokenizer(load_tokenizer(model_a, revision_a, trust_remote_code=a.trust_remote_code),
                           load_tokenizer(model_b, revision_b, trust_remote_code=b.trust_remote_code))
    eps_values = sorted(float(e) for e in set(eps_values))
    options = dict(eps_values=eps_values, n_perturb=n_perturb, max_length=max_length, batch_size=batch_size,
                   seed=seed, device=device, dtype=dtype)
    rows_a, shape = model_rows(model_a, name_a, texts, revision=revision_a, arch_spec=a.arch_spec,
                               trust_remote_code=a.trust_remote_code, **options)
    rows_b, _ = model_rows(model_b, name_b, texts, revision=revision_b, arch_spec=b.arch_spec,
                           trust_remote_code=b.trust_remote_code, reference_shape=shape, **options)
    rows = rows_a + rows_b
    folder.mkdir(parents=True, exist_ok=True)
    clear_complete(folder)
    atomic_write_csv(folder / outputs.LIPSCHITZ_CSV, rows, CSV_COLUMNS)
    summary = summarise(rows, name_a, name_b)
    summary.update({"model_a": model_a, "model_b": model_b, "revision_a": revision_a, "revision_b": revision_b,
                    "n_perturb": n_perturb, "seed": seed,
                    "max_length": max_length, "dtype": dtype,
                    "lipschitz_definition": "||f(e+delta) - f(e)||_F / ||delta||_F over a text's real tokens, "
                                            "per text and draw; hidden = last block output before the final norm",
                    "grad_norm_definition": "||d mean next-token NLL / d inputs_embeds||_F per text",
                    "output_variance_definition": "variance of the logits across draws, mean over real tokens "
                                                  "and vocabulary entries, mean over texts"})
    atomic_write_json(folder / "summary.json", summary)
    plot_results(rows, name_a, name_b, folder / "lipschitz_comparison.png")
    mark_complete(folder, {"step": "lipschitz"}, inputs)
    return folder
