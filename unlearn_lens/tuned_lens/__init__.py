"""Tuned lens: per-layer affine translators, trained, then read out on WMDP questions.

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
the translated states go through the logit lens's own scoring (``analyses.activations.logit_lens``), so the
two lenses differ only by the translators.

The modules follow the data flow: ``lens`` (the translators module), ``model_data`` and
``cache_data`` (hidden states from a forward pass or from the cache, as ``questions``' letter and
cloze inputs), ``training`` (KL and Adam), ``scoring`` (accuracy per layer), ``files`` (the
safetensors, the figure) and ``step`` (``run_tuned_lens``, the whole command). This package
re-exports the names the rest of the project uses.
"""

from unlearn_lens.tuned_lens.cache_data import (cache_token_residuals, cloze_data_from_cache, letter_data_from_cache,
                                                open_cache_splits)
from unlearn_lens.tuned_lens.files import load_translators
from unlearn_lens.tuned_lens.lens import lens_for_model
from unlearn_lens.tuned_lens.model_data import (cloze_data_from_model, cloze_sequences, letter_data_from_model,
                                                model_token_residuals, run_with_residuals)
from unlearn_lens.tuned_lens.scoring import lens_accuracies, readout_parameters
from unlearn_lens.tuned_lens.step import (TUNED_LENS_MAX_SAMPLES, TunedLensSettings, run_tuned_lens,
                                          validate_options)
from unlearn_lens.tuned_lens.training import kl_by_layer, train_tuned_lens

__all__ = [
    "cache_token_residuals", "cloze_data_from_cache", "cloze_data_from_model", "cloze_sequences", "kl_by_layer",
    "lens_accuracies", "lens_for_model", "letter_data_from_cache", "letter_data_from_model", "load_translators",
    "model_token_residuals", "open_cache_splits", "readout_parameters", "run_tuned_lens", "run_with_residuals",
    "train_tuned_lens", "validate_options", "TUNED_LENS_MAX_SAMPLES", "TunedLensSettings",
]
