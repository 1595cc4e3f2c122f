"""The tuned-lens step: check the options, train the translators, score WMDP, write the folder.

It joins the other modules of the package along the data flow: training residuals from the
activation cache where it holds the split (``cache_data``), else from the model
(``model_data``); the lens (``lens``) trained on them (``training``); the WMDP questions' states
from either source, scored per layer (``scoring``); and ``OUT/<name>/wmdp_tuned_lens/``
(``files``, ``OUTPUTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.identity import inputs_record
from unlearn_lens.core.limits import check_at_least, check_counts, check_positive
from unlearn_lens.core.settings import SHORT_MAX_LENGTH, Compute, ModelRef
from unlearn_lens.lipschitz import tokenize_texts
from unlearn_lens.tuned_lens.cache_data import (cache_token_residuals, check_cache_matches, cloze_data_from_cache,
                                                letter_data_from_cache, open_cache_splits)
from unlearn_lens.tuned_lens.files import CSV_COLUMNS, plot_accuracies
from unlearn_lens.tuned_lens.files import write_safetensors as _write_safetensors
from unlearn_lens.tuned_lens.lens import PARAMETRISATION, lens_for_model
from unlearn_lens.tuned_lens.model_data import cloze_data_from_model, letter_data_from_model, model_token_residuals
from unlearn_lens.tuned_lens.scoring import lens_accuracies, readout_parameters, summarise
from unlearn_lens.tuned_lens.training import kl_by_layer, train_tuned_lens


def validate_options(*, steps: int, lr: float, tokens_per_step: int, batch_size: int, max_length: int,
                     max_samples: int | None, train_split: str, name: str) -> None:
    """One-line errors for option values that cannot work."""

    if steps < 0:
        raise UserError(f"--steps must be >= 0 (0 keeps the identity translators: the logit lens), got {steps}")
    check_positive("--lr", lr)
    check_at_least("--tokens-per-step", tokens_per_step, 1)
    check_counts(batch_size=batch_size, max_length=max_length, max_samples=max_samples)
    if train_split not in ("forget", "retain"):
        raise UserError(f"--train-split must be forget or retain, got {train_split!r}")
    outputs.check_model_name(name, "--name")


#: Tokens on which the mean KL before and after training is reported: two training steps' worth, at
#: most ``KL_REPORT_TOKENS``. The report costs a forward through every layer's readout, as much as
#: a training step per 128 tokens; at the default 512 tokens per step it reads 1024 tokens as before.
KL_REPORT_TOKENS = 1024


def kl_report_tokens(tokens_per_step: int) -> int:
    """How many training tokens the before / after KL of ``summary.json`` is measured on."""
    return min(KL_REPORT_TOKENS, 2 * tokens_per_step)


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
    from cache_store.identity import identity_of
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.data import data_hash, read_mcq, read_texts
    from unlearn_lens.loading import load_model

    validate_options(steps=steps, lr=lr, tokens_per_step=tokens_per_step, batch_size=batch_size,
                     max_length=max_length, max_samples=max_samples, train_split=train_split, name=name)
    folder = outputs.model_dir(outdir, name) / outputs.TUNED_LENS
    splits = open_cache_splits(cache)
    inputs = inputs_record(models=[("model", model_spec, revision)], data=data_dir, settings=settings,
                           caches={"cache": identity_of({n: ds.attrs for n, ds in splits.items()})} if splits else None)
    if is_complete(folder, inputs) and not overwrite:
        return folder
    items = read_mcq(data_dir)
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
    kl_tokens, resid_tokens = kl_report_tokens(tokens_per_step), int(resid.shape[1])
    kl_before = kl_by_layer(lens, resid, device=device, max_tokens=kl_tokens)
    with tqdm(total=steps, desc=f"tuned lens {name}: training", unit="step") as progress:
        log = train_tuned_lens(lens, resid, steps=steps, lr=lr, tokens_per_step=tokens_per_step, seed=seed,
                               device=device, progress=progress)
    kl_after = kl_by_layer(lens, resid, device=device, max_tokens=kl_tokens)
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
        "kl_measured_on": f"the first {min(kl_tokens, resid_tokens)} training tokens",
    })
    atomic_write_csv(folder / "training_kl.csv",
                     [{"layer": l, "kl_initial": kl_before[l], "kl_final": kl_after[l]} for l in range(len(kl_before))],
                     ["layer", "kl_initial", "kl_final"])
    atomic_write_csv(folder / "train_log.csv", log, ["step", "mean_kl"])
    atomic_write_csv(folder / outputs.LENS_CSV, rows, CSV_COLUMNS)
    summary = summarise(rows)
    summary.update({"lens": "tuned", "model": name, "train_split": train_split, "steps": steps,
                    "mean_kl_initial": float(np.mean(kl_before[:-1])) if len(kl_before) > 1 else 0.0,
                    "mean_kl_final": float(np.mean(kl_after[:-1])) if len(kl_after) > 1 else 0.0})
    atomic_write_json(folder / "summary.json", summary)
    plot_accuracies(rows, f"Tuned lens WMDP accuracy by layer: {name}", folder / "wmdp_tuned_lens.png")
    mark_complete(folder, {"step": "tuned_lens"}, inputs)
    return folder
