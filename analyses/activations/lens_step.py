"""The logit lens from the caches: gather what it needs from the wmdp splits, then score every layer.

``lens_inputs`` returns small eager metadata and the lazy arrays to load (evaluated together with
other models' in one ``compute``); ``lens_results`` turns the loaded arrays into the rows of
``wmdp_lens_results.csv`` with ``analyses.activations.logit_lens``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analyses.activations import logit_lens
from analyses.activations.execution import map_threads


def lens_inputs(wmdp: xr.Dataset, cloze: xr.Dataset, max_samples: int | None) -> dict:
    """Small eager metadata plus the lazy arrays the lens needs (gathered continuation states)."""
    n_questions = wmdp.sizes["sample"] if max_samples is None else min(max_samples, wmdp.sizes["sample"])
    question = cloze["question"].values
    samples = np.flatnonzero(question < n_questions)
    token_index, owner = logit_lens.cloze_positions(cloze["sample_offset"].values, cloze["cont_start"].values,
                                                    cloze["cont_end"].values, samples, cloze["token_position"].values,
                                                    cloze["sample_length"].values)
    input_ids = cloze["input_ids"].values  # the next kept token is the next position: capture keeps them all
    return {
        "n_questions": n_questions, "samples": samples, "owner": owner, "targets": input_ids[token_index + 1],
        "layers": [int(v) for v in wmdp["layer"].values],
        "question": question[samples], "choice_index": cloze["choice_index"].values[samples],
        "final_cloze_logprob": cloze["final_cloze_logprob"].values[samples],
        "norm": {"kind": wmdp.attrs["final_norm_kind"], "eps": float(wmdp.attrs["final_norm_eps"]),
                 "weight": wmdp["final_norm_weight"].values, "bias": wmdp["final_norm_bias"].values},
        "lazy": {"last": wmdp["last"].data[:, :n_questions],
                 "cloze_states": cloze["resid"].data[:, token_index],
                 "answer": wmdp["answer"].data[:n_questions],
                 "letter_unembed": wmdp["letter_unembed"].data,
                 "final_letter_logits": wmdp["final_letter_logits"].data[:n_questions]},
    }


def lens_results(inputs: dict, loaded: dict, unembedding: np.ndarray, progress: bool) -> tuple[list[dict], dict]:
    """Rows of ``wmdp_lens_results.csv`` (both scorings) and a summary with self-consistency checks."""
    norm = inputs["norm"]
    if norm["kind"] == "rmsnorm":
        norm = {**norm, "bias": None}
    answer = np.asarray(loaded["answer"]).astype(int)
    letter = logit_lens.letter_predictions(loaded["last"], loaded["letter_unembed"], norm)
    own_letter = np.asarray(loaded["final_letter_logits"]).argmax(axis=1)
    scores = logit_lens.cloze_scores(loaded["cloze_states"], inputs["targets"], inputs["owner"],
                                     len(inputs["samples"]), unembedding, norm, map_blocks=map_threads)
    questions = np.arange(inputs["n_questions"])
    cloze = logit_lens.cloze_predictions(scores, inputs["question"], inputs["choice_index"], questions)
    own_cloze = logit_lens.cloze_predictions(inputs["final_cloze_logprob"][None, :], inputs["question"],
                                             inputs["choice_index"], questions)[0]
    layers = inputs.get("layers")
    rows = (logit_lens.accuracy_rows("letter", letter, answer, layers)
            + logit_lens.accuracy_rows("cloze", cloze, answer, layers))
    summary = {}
    numbers = layers if layers is not None else list(range(len(letter)))
    for scoring, predictions, own in (("letter", letter, own_letter), ("cloze", cloze, own_cloze)):
        accuracy = (predictions == answer[None, :]).mean(axis=1)
        summary[scoring] = {
            "final_layer_accuracy": float(accuracy[-1]), "best_layer": int(numbers[int(accuracy.argmax())]),
            "best_accuracy": float(accuracy.max()), "model_own_accuracy": float((own == answer).mean()),
            "final_layer_agreement_with_model": float((predictions[-1] == own).mean())}
    summary["cloze"]["final_layer_max_abs_logprob_difference"] = float(
        np.max(np.abs(scores[-1] - inputs["final_cloze_logprob"]))) if scores.size else 0.0
    summary.update({"n_questions": int(inputs["n_questions"]), "chance": 0.25,
                    "final_norm": f"{norm['kind']} applied once at every layer, in float32"})
    return rows, summary
