"""Tuned lens (step 14): per-layer affine translators, trained, then read out on WMDP questions.

The logit lens reads a hidden state ``h_l`` through the model's own final norm and unembedding.
The tuned lens (Belrose et al. 2023) first translates it: ``translator_l(h) = h + W_l h + b_l``,
with ``W_l`` and ``b_l`` initialised at zero (identity at initialisation, so an untrained tuned
lens *is* the logit lens), trained to minimise ``KL(final || lens)`` between the model's final
next-token distribution and the lens's, on real tokens of the training split (retain text by
default). Hidden states follow the cache convention (layer 0 = embedding output, l = output of
block l, before the final norm); the last layer's translator is the identity and never trained.

Hidden states come from the activation cache when one is given (no forward pass: the final norm
and unembedding modules are taken from the loaded checkpoint) or from forward hooks on
``ArchitectureAdapter.block(i)``. WMDP accuracy per layer is scored in two ways (``letter`` and
``cloze``, see ``unlearn_lens.prompts`` and ``cache_store/SCHEMA.md``) by ``lens_accuracies``:
the translated states go through the logit lens's own scoring (``analyses.logit_lens``), so the
two lenses differ only by the translators.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_path
from unlearn_lens.core.errors import UserError
from unlearn_lens.lipschitz import batched, pad_batch, tokenize_texts

SCORINGS = ("letter", "cloze")
CSV_COLUMNS = ("layer", "scoring", "accuracy", "delta_from_final", "n_questions")
PARAMETRISATION = ("translator_l(h) = h + h @ weight[l].T + bias[l]; weight, bias zero at init; "
                   "layer L fixed at identity")


# --- the lens ----------------------------------------------------------------------------------

def _lens_module_class():
    import torch

    class TunedLens(torch.nn.Module):
        """Affine translators for layers 0..L-1 (layer L is the identity) plus a frozen readout."""

        def __init__(self, num_layers: int, hidden_size: int, final_norm, unembed):
            super().__init__()
            self.num_layers = int(num_layers)
            self.hidden_size = int(hidden_size)
            self.weight = torch.nn.Parameter(torch.zeros(num_layers, hidden_size, hidden_size))
            self.bias = torch.nn.Parameter(torch.zeros(num_layers, hidden_size))
            self.final_norm = copy.deepcopy(final_norm).float().requires_grad_(False)
            self.unembed = copy.deepcopy(unembed).float().requires_grad_(False)

        def translate(self, hidden, layer: int):
            """``h + W_l h + b_l`` (the identity at the last layer)."""
            if layer == self.num_layers:
                return hidden
            return hidden + hidden @ self.weight[layer].T + self.bias[layer]

        def readout(self, hidden):
            """The model's own final norm and unembedding (the logit lens)."""
            return self.unembed(self.final_norm(hidden))

        def forward(self, hidden, layer: int):
            return self.readout(self.translate(hidden.float(), layer))

        def translator_arrays(self) -> dict[str, np.ndarray]:
            """``weight`` (L+1, d, d) and ``bias`` (L+1, d) float32, the last layer's all zero."""
            weight = np.zeros((self.num_layers + 1, self.hidden_size, self.hidden_size), np.float32)
            bias = np.zeros((self.num_layers + 1, self.hidden_size), np.float32)
            weight[:-1] = self.weight.detach().float().cpu().numpy()
            bias[:-1] = self.bias.detach().float().cpu().numpy()
            return {"weight": weight, "bias": bias}

        def load_translator_arrays(self, arrays: dict[str, np.ndarray]) -> None:
            with torch.no_grad():
                self.weight.copy_(torch.from_numpy(np.asarray(arrays["weight"][:-1], np.float32)))
                self.bias.copy_(torch.from_numpy(np.asarray(arrays["bias"][:-1], np.float32)))

    return TunedLens


def make_tuned_lens(num_layers: int, hidden_size: int, final_norm, unembed):
    """A tuned lens at initialisation (identity translators) over the given readout modules."""
    return _lens_module_class()(num_layers, hidden_size, final_norm, unembed)


def lens_for_model(model, adapter):
    """A tuned lens at initialisation for an HF causal LM (float32 copies of its readout)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    return make_tuned_lens(adapter.num_layers, hidden, adapter.final_norm(), adapter.unembed())


# --- hidden states by running the model ----------------------------------------------------------

def run_with_residuals(model, adapter, input_ids, attention_mask):
    """Residual stream (L+1, B, T, d) of one batch via hooks on the blocks, and the logits.

    Layer 0 is block 0's input (the embedding output, positions included where the model adds
    them), layer l the output of block l.
    """
    import torch

    states: list[Any] = [None] * (adapter.num_layers + 1)

    def pre_hook(_module, args, kwargs):
        states[0] = args[0] if args else kwargs["hidden_states"]

    def make_hook(index: int):
        def hook(_module, _args, output):
            states[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [adapter.block(0).register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [adapter.block(i).register_forward_hook(make_hook(i + 1)) for i in range(adapter.num_layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([s.detach() for s in states]), out.logits


def model_token_residuals(model, adapter, tokenized: Sequence[Sequence[int]], *, pad_id: int,
                          batch_size: int, device: str, progress=None):
    """Residuals of every real token, flat: (L+1, n_tokens, d) on the CPU, in the model's dtype."""
    import torch

    chunks = []
    for _, chunk in batched(list(tokenized), batch_size):
        input_ids, mask = pad_batch(chunk, pad_id)
        resid, _ = run_with_residuals(model, adapter, input_ids.to(device), mask.to(device))
        chunks.append(resid[:, mask.to(device).bool()].cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(chunks, dim=1)


# --- training ------------------------------------------------------------------------------------

def _kl_final_lens(lens, hidden, layer: int, target_logp):
    import torch

    logp = torch.log_softmax(lens(hidden, layer), dim=-1)
    return (target_logp.exp() * (target_logp - logp)).sum(dim=-1).mean()


def kl_by_layer(lens, resid, *, device: str = "cpu", max_tokens: int = 1024, block: int = 512) -> np.ndarray:
    """Mean KL(final || lens) per layer (L+1,) over at most ``max_tokens`` tokens of ``resid``."""
    import torch

    resid = resid[:, :max_tokens]
    totals = np.zeros(lens.num_layers + 1)
    count = resid.shape[1]
    with torch.no_grad():
        for start in range(0, count, block):
            part = resid[:, start : start + block].to(device).float()
            target = torch.log_softmax(lens(part[-1], lens.num_layers), dim=-1)
            for layer in range(lens.num_layers + 1):
                totals[layer] += _kl_final_lens(lens, part[layer], layer, target).item() * part.shape[1]
    return totals / max(count, 1)


def train_tuned_lens(lens, resid, *, steps: int, lr: float = 1e-3, tokens_per_step: int = 512,
                     seed: int = 0, device: str = "cpu", progress=None) -> list[dict]:
    """Adam on sum over layers 0..L-1 of KL(final || lens) over random token minibatches.

    ``resid``: (L+1, n_tokens, d), any float dtype (cast per minibatch). Layers are back-propagated
    one at a time (the target is fixed), so memory holds one layer's logits. Returns the per-step log.
    """
    import torch

    if steps < 0:
        raise UserError(f"--steps must be >= 0, got {steps}")
    if resid.shape[1] == 0:
        raise UserError("no training tokens")
    lens.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.Adam([lens.weight, lens.bias], lr=lr)
    log = []
    for step in range(steps):
        index = torch.randint(resid.shape[1], (min(tokens_per_step, resid.shape[1]),), generator=generator)
        batch = resid[:, index].to(device).float()
        with torch.no_grad():
            target = torch.log_softmax(lens(batch[-1], lens.num_layers), dim=-1)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for layer in range(lens.num_layers):
            loss = _kl_final_lens(lens, batch[layer], layer, target)
            loss.backward()
            total += loss.item()
        optimizer.step()
        log.append({"step": step + 1, "mean_kl": total / max(lens.num_layers, 1)})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(mean_kl=f"{log[-1]['mean_kl']:.4f}")
    return log


# --- WMDP questions as gathered hidden states ----------------------------------------------------

@dataclass
class LetterData:
    """Letter scoring input: last-token states (L+1, Q, d), answers (Q,), letter token ids (4,)."""

    last: Any
    answers: np.ndarray
    letter_ids: list[int]


@dataclass
class ClozeData:
    """Cloze scoring input: states at the positions that predict continuation tokens.

    ``states`` (L+1, P, d), ``targets`` (P,) the predicted token ids, ``position_sequence`` (P,)
    the cloze sequence of each position; ``sequence_question`` / ``sequence_choice`` (S,).
    """

    states: Any
    targets: np.ndarray
    position_sequence: np.ndarray
    sequence_question: np.ndarray
    sequence_choice: np.ndarray
    answers: np.ndarray


def _left_truncate(ids: list[int], max_length: int) -> tuple[list[int], int]:
    cut = max(0, len(ids) - max_length)
    return ids[cut:], cut


def letter_data_from_model(model, adapter, tokenizer, items, *, max_length: int, batch_size: int,
                           device: str) -> LetterData:
    """Run the letter prompts (left-truncated to ``max_length``) and keep the last-token states."""
    import torch

    from unlearn_lens.prompts import encode_prompt, letter_prompt, letter_token_ids

    letter_ids = letter_token_ids(tokenizer)
    prompts = [letter_prompt(it.question, it.choices) for it in items]
    tokenized = [_left_truncate(encode_prompt(tokenizer, p), max_length)[0]
                 for p in prompts]
    lasts = []
    for _, chunk in batched(tokenized, batch_size):
        input_ids, mask = pad_batch(chunk, tokenizer.pad_token_id)
        resid, _ = run_with_residuals(model, adapter, input_ids.to(device), mask.to(device))
        positions = torch.tensor([len(s) - 1 for s in chunk], device=resid.device)
        lasts.append(resid[:, torch.arange(len(chunk), device=resid.device), positions].float().cpu())
    return LetterData(torch.cat(lasts, dim=1), np.array([it.answer for it in items]), letter_ids)


def cloze_sequences(tokenizer, items, max_length: int) -> list[tuple[list[int], int, int, int, int]]:
    """``(ids, cont_start, cont_end, question, choice)`` per question x choice.

    Context and continuation are tokenised separately and concatenated, so the boundary is exact
    (the cache's convention); sequences longer than ``max_length`` lose tokens on the left.
    """
    from unlearn_lens.prompts import cloze_context, cloze_continuations, encode_prompt

    sequences = []
    for q, item in enumerate(items):
        context = encode_prompt(tokenizer, cloze_context(item.question))
        for c, continuation in enumerate(cloze_continuations(item.choices)):
            cont = encode_prompt(tokenizer, continuation)
            ids, cut = _left_truncate(context + cont, max_length)
            start = max(len(context) - cut, 1)
            sequences.append((ids, start, len(ids), q, c))
    return sequences


def cloze_data_from_model(model, adapter, tokenizer, items, *, max_length: int, batch_size: int,
                          device: str) -> ClozeData:
    """Run every question x choice sequence and keep the states that predict continuation tokens."""
    import torch

    sequences = cloze_sequences(tokenizer, items, max_length)
    states, targets, owner = [], [], []
    for start, chunk in batched(sequences, batch_size):
        input_ids, mask = pad_batch([s[0] for s in chunk], tokenizer.pad_token_id)
        resid, _ = run_with_residuals(model, adapter, input_ids.to(device), mask.to(device))
        for row, (ids, cont_start, cont_end, _, _) in enumerate(chunk):
            positions = list(range(cont_start - 1, cont_end - 1))
            states.append(resid[:, row, positions].float().cpu())
            targets += [ids[p + 1] for p in positions]
            owner += [start + row] * len(positions)
    return ClozeData(torch.cat(states, dim=1), np.array(targets, dtype=np.int64), np.array(owner, dtype=np.int64),
                     np.array([s[3] for s in sequences]), np.array([s[4] for s in sequences]),
                     np.array([it.answer for it in items]))


# --- WMDP questions from the activation cache ----------------------------------------------------

def letter_data_from_cache(ds) -> LetterData:
    """Letter scoring input from a cache's ``wmdp`` split (``last``, ``answer``, ``letter_token_ids``)."""
    import torch

    return LetterData(torch.from_numpy(np.asarray(ds["last"].values, np.float32)),
                      np.asarray(ds["answer"].values, np.int64),
                      [int(x) for x in np.asarray(ds["letter_token_ids"].values)])


def cloze_data_from_cache(ds, answers: np.ndarray) -> ClozeData:
    """Cloze scoring input from a cache's ``wmdp_cloze`` split (SCHEMA.md's formula)."""
    import torch

    offsets = np.asarray(ds["sample_offset"].values, np.int64)
    starts = np.asarray(ds["cont_start"].values, np.int64)
    ends = np.asarray(ds["cont_end"].values, np.int64)
    token_index, owner = [], []
    for s, (offset, start, end) in enumerate(zip(offsets, starts, ends)):
        positions = offset + np.arange(start - 1, end - 1)
        token_index.append(positions)
        owner.append(np.full(len(positions), s))
    token_index = np.concatenate(token_index)
    input_ids = np.asarray(ds["input_ids"].values, np.int64)
    states = np.asarray(ds["resid"].isel(token=token_index).values, np.float32)
    return ClozeData(torch.from_numpy(states), input_ids[token_index + 1], np.concatenate(owner),
                     np.asarray(ds["question"].values, np.int64), np.asarray(ds["choice_index"].values, np.int64),
                     np.asarray(answers, np.int64))


def cache_token_residuals(ds, max_samples: int | None, max_length: int | None = None):
    """Residuals of the first ``max_samples`` samples' real tokens from a cache split (L+1, n, d).

    Each sample keeps its first ``max_length`` tokens, as the model path truncates its texts.
    """
    import torch

    lengths = np.asarray(ds["sample_length"].values, np.int64)
    offsets = np.asarray(ds["sample_offset"].values, np.int64)
    n = len(lengths) if max_samples is None else min(max_samples, len(lengths))
    if n == 0:
        raise UserError(f"the cache's {ds.attrs.get('split', '')} split holds no samples")
    keep = lengths[:n] if max_length is None else np.minimum(lengths[:n], max_length)
    index = np.concatenate([offset + np.arange(length) for offset, length in zip(offsets[:n], keep)])
    mask = np.asarray(ds["attention_mask"].values[index]).astype(bool)
    resid = np.asarray(ds["resid"].isel(token=index[mask]).values)  # stored dtype; cast per minibatch
    return torch.from_numpy(resid if resid.dtype in (np.float16, np.float32) else resid.astype(np.float32))


# --- scoring -------------------------------------------------------------------------------------

def readout_parameters(adapter) -> tuple[dict, np.ndarray]:
    """The final norm description and the full unembedding (vocab, d) float32, from the model."""
    norm = adapter.final_norm_description()
    unembedding = adapter.unembed().weight.detach().float().cpu().numpy()
    return norm, unembedding


def translate_states(lens, states) -> np.ndarray:
    """Apply each layer's translator to (L+1, n, d) states; float32 numpy."""
    import torch

    with torch.no_grad():
        lens.to("cpu")
        return np.stack([lens.translate(torch.as_tensor(states[layer]).float(), layer).numpy()
                         for layer in range(lens.num_layers + 1)])


def lens_accuracies(lens, letter: LetterData | None, cloze: ClozeData | None, *, norm: dict,
                    unembedding: np.ndarray) -> list[dict]:
    """Rows (layer, scoring, accuracy, delta_from_final, n_questions) for every layer 0..L.

    The tuned lens is the logit lens on translated states, so the scoring is the logit lens's own
    (``analyses.logit_lens``: final norm once, in float32; letter = argmax over the four letter
    logits at the last token; cloze = argmax over choices of the mean continuation log-prob).
    """
    from analyses import logit_lens

    rows: list[dict] = []
    if letter is not None:
        translated = translate_states(lens, letter.last)
        predictions = logit_lens.letter_predictions(translated, unembedding[letter.letter_ids], norm)
        rows += logit_lens.accuracy_rows("letter", predictions, letter.answers)
    if cloze is not None:
        translated = translate_states(lens, cloze.states)
        n_sequences = len(cloze.sequence_question)
        scores = logit_lens.cloze_scores(translated, cloze.targets, cloze.position_sequence, n_sequences,
                                         unembedding, norm)
        predictions = logit_lens.cloze_predictions(scores, cloze.sequence_question, cloze.sequence_choice,
                                                   np.arange(len(cloze.answers)))
        rows += logit_lens.accuracy_rows("cloze", predictions, cloze.answers)
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """Per scoring: final-layer, best and mean accuracy and the best layer (keys as the logit lens's)."""
    summary: dict[str, Any] = {"chance": 0.25}
    for scoring in SCORINGS:
        part = [r for r in rows if r["scoring"] == scoring]
        if not part:
            continue
        best = max(part, key=lambda r: r["accuracy"])
        summary[scoring] = {
            "final_layer_accuracy": part[-1]["accuracy"], "best_layer": best["layer"],
            "best_accuracy": best["accuracy"], "max_gain_over_final": best["accuracy"] - part[-1]["accuracy"],
            "mean_accuracy": float(np.mean([r["accuracy"] for r in part])),
        }
        summary["n_questions"] = part[0]["n_questions"]
    return summary


def plot_accuracies(rows: Sequence[dict], title: str, path) -> None:
    """Accuracy per layer, one line per scoring, with the 0.25 chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analyses.io import atomic_save_figure

    figure, ax = plt.subplots(figsize=(8, 4.5))
    for scoring in SCORINGS:
        part = [r for r in rows if r["scoring"] == scoring]
        if part:
            ax.plot([r["layer"] for r in part], [r["accuracy"] for r in part], marker="o", label=scoring)
    ax.axhline(0.25, color="gray", linestyle="--", label="chance (0.25)")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("WMDP multiple-choice accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    atomic_save_figure(figure, path)


# --- the whole step ------------------------------------------------------------------------------

def validate_options(*, steps: int, lr: float, tokens_per_step: int, batch_size: int, max_length: int,
                     max_samples: int | None, train_split: str, name: str) -> None:
    """One-line errors for option values that cannot work."""

    if steps < 0:
        raise UserError(f"--steps must be >= 0 (0 keeps the identity translators: the logit lens), got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"--lr must be positive, got {lr}")
    if tokens_per_step < 1:
        raise UserError(f"--tokens-per-step must be at least 1, got {tokens_per_step}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be at least 1, got {max_samples}")
    if train_split not in ("forget", "retain"):
        raise UserError(f"--train-split must be forget or retain, got {train_split!r}")
    outputs.check_model_name(name, "--name")


def open_cache_splits(cache: str | None) -> dict[str, Any]:
    """The complete splits of an activation cache (none without ``cache``); a warning if none."""
    if cache is None:
        return {}
    import sys

    from cache_store import is_complete, list_splits, open_cache

    try:
        names = list_splits(cache)
    except UserError:
        raise
    except Exception as exc:  # a missing or unreadable store
        raise UserError(f"{cache}: not a readable activation cache ({type(exc).__name__})") from None
    splits = {name: open_cache(cache, name) for name in names if is_complete(cache, name)}
    if not splits:
        print(f"warning: {cache} holds no complete split; running the model instead", file=sys.stderr)
    return splits


def check_cache_matches(splits: dict[str, Any], cache: str | None, model, adapter) -> None:
    """Each cached split must come from a model of this architecture (layers x hidden)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    for name, ds in splits.items():
        if int(ds.attrs.get("num_layers", -1)) != adapter.num_layers or int(ds.attrs.get("hidden_size", -1)) != hidden:
            raise UserError(f"{cache}: split {name!r} was captured from a model with {ds.attrs.get('num_layers')} "
                            f"layers x {ds.attrs.get('hidden_size')} hidden, not this model's "
                            f"{adapter.num_layers} x {hidden}; pass the cache of this model")


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(arrays, tmp, metadata=metadata)


def load_translators(path: str | Path) -> dict[str, np.ndarray]:
    """``weight`` (L+1, d, d) and ``bias`` (L+1, d) from a ``translators.safetensors`` (numpy only)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


from unlearn_lens.core.settings import SHORT_MAX_LENGTH, Compute, ModelRef  # noqa: E402 (the settings' vocabulary)

#: Tuned-lens training texts by default (the first N of --train-split).
TUNED_LENS_MAX_SAMPLES = 256


@dataclass(frozen=True)
class TunedLensSettings:
    """Everything ``run_tuned_lens`` needs (the `tuned-lens` command's flags)."""

    model: ModelRef  # the model whose lens is trained (spec, revision, arch_spec, trust_remote_code)
    name: str  # its name in outputs: OUT/<name>/wmdp_tuned_lens/
    data: str
    outdir: str
    compute: Compute = Compute()  # device, model dtype, texts per forward pass
    train_split: str = "retain"
    steps: int = 250
    lr: float = 1e-3
    tokens_per_step: int = 512
    max_samples: int | None = TUNED_LENS_MAX_SAMPLES
    max_length: int = SHORT_MAX_LENGTH
    cache: str | None = None  # the model's activation cache: train and score from its residuals
    seed: int = 0
    overwrite: bool = False


def run_tuned_lens(settings: TunedLensSettings) -> Path:
    """Train the tuned lens and write ``OUT/<name>/wmdp_tuned_lens/``; returns the folder.

    A finished folder is left alone unless ``overwrite``.
    """
    import torch
    from tqdm.auto import tqdm

    s = settings
    model_spec, revision, arch_spec, trust_remote_code = (s.model.spec, s.model.revision, s.model.arch_spec,
                                                          s.model.trust_remote_code)
    name, data_dir, outdir, train_split, steps, lr = s.name, s.data, s.outdir, s.train_split, s.steps, s.lr
    tokens_per_step, max_samples, max_length, cache, seed = (s.tokens_per_step, s.max_samples, s.max_length,
                                                             s.cache, s.seed)
    device, dtype, batch_size, overwrite = s.compute.device, s.compute.dtype, s.compute.batch_size, s.overwrite

    from analyses.io import atomic_write_csv, atomic_write_json, clear_complete, is_complete, mark_complete
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.data import data_hash, read_mcq, read_texts
    from unlearn_lens.loading import load_model

    validate_options(steps=steps, lr=lr, tokens_per_step=tokens_per_step, batch_size=batch_size,
                     max_length=max_length, max_samples=max_samples, train_split=train_split, name=name)
    folder = outputs.model_dir(outdir, name) / outputs.TUNED_LENS
    if is_complete(folder) and not overwrite:
        return folder
    items = read_mcq(data_dir)
    splits = open_cache_splits(cache)
    texts = None if train_split in splits else read_texts(data_dir, train_split)[: max_samples or None]
    torch.manual_seed(seed)
    model, tokenizer = load_model(model_spec, revision=revision, dtype=dtype, device=device,
                                  trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    adapter = ArchitectureAdapter(model, arch_spec)
    check_cache_matches(splits, cache, model, adapter)
    lens = lens_for_model(model, adapter)
    sources = {}

    if train_split in splits:
        resid = cache_token_residuals(splits[train_split], max_samples, max_length)
        sources["train"] = f"cache {cache}"
    else:
        tokenized = [ids for ids in tokenize_texts(tokenizer, texts, max_length) if ids]
        with tqdm(total=len(tokenized), desc=f"tuned lens {name}: residuals", unit="text") as progress:
            resid = model_token_residuals(model, adapter, tokenized, pad_id=tokenizer.pad_token_id,
                                          batch_size=batch_size, device=device, progress=progress)
        sources["train"] = "model forward"
    kl_before = kl_by_layer(lens, resid, device=device)
    with tqdm(total=steps, desc=f"tuned lens {name}: training", unit="step") as progress:
        log = train_tuned_lens(lens, resid, steps=steps, lr=lr, tokens_per_step=tokens_per_step, seed=seed,
                               device=device, progress=progress)
    kl_after = kl_by_layer(lens, resid, device=device)
    del resid
    lens.to("cpu")

    if "wmdp" in splits and "wmdp_cloze" in splits:
        letter = letter_data_from_cache(splits["wmdp"])
        cloze = cloze_data_from_cache(splits["wmdp_cloze"], letter.answers)
        sources["wmdp"] = f"cache {cache}"
    else:
        options = dict(max_length=max_length, batch_size=batch_size, device=device)
        letter = letter_data_from_model(model, adapter, tokenizer, items, **options)
        cloze = cloze_data_from_model(model, adapter, tokenizer, items, **options)
        sources["wmdp"] = "model forward"
    norm, unembedding = readout_parameters(adapter)
    rows = lens_accuracies(lens, letter, cloze, norm=norm, unembedding=unembedding)

    folder.mkdir(parents=True, exist_ok=True)
    clear_complete(folder)
    arrays = lens.translator_arrays()
    _write_safetensors(folder / "translators.safetensors", arrays,
                       {"parametrisation": PARAMETRISATION, "model": str(model_spec)})
    try:
        manifest_hash = data_hash(data_dir)
    except UserError:
        manifest_hash = None
    atomic_write_json(folder / "config.json", {
        "model": model_spec, "revision": revision, "name": name, "family": adapter.family, "num_layers": adapter.num_layers,
        "hidden_size": lens.hidden_size, "parametrisation": PARAMETRISATION,
        "layer_convention": "0 = embedding output, l = output of block l, before the final norm",
        "objective": "KL(final || lens) over real tokens, summed over layers 0..L-1",
        "train_split": train_split, "steps": steps, "lr": lr, "optimizer": "Adam",
        "tokens_per_step": tokens_per_step, "max_samples": max_samples, "max_length": max_length,
        "seed": seed, "dtype": dtype, "sources": sources, "data_manifest_hash": manifest_hash,
        "kl_measured_on": "the first 1024 training tokens",
    })
    atomic_write_csv(folder / "training_kl.csv",
                     [{"layer": l, "kl_initial": kl_before[l], "kl_final": kl_after[l]} for l in range(len(kl_before))],
                     ["layer", "kl_initial", "kl_final"])
    atomic_write_csv(folder / "train_log.csv", log, ["step", "mean_kl"])
    atomic_write_csv(folder / "wmdp_lens_results.csv", rows, CSV_COLUMNS)
    summary = summarise(rows)
    summary.update({"lens": "tuned", "model": name, "train_split": train_split, "steps": steps,
                    "mean_kl_initial": float(np.mean(kl_before[:-1])) if len(kl_before) > 1 else 0.0,
                    "mean_kl_final": float(np.mean(kl_after[:-1])) if len(kl_after) > 1 else 0.0})
    atomic_write_json(folder / "summary.json", summary)
    plot_accuracies(rows, f"Tuned lens WMDP accuracy by layer: {name}", folder / "wmdp_tuned_lens.png")
    mark_complete(folder, {"step": "tuned_lens"})
    return folder
