"""WMDP accuracy per layer through the tuned lens, and its summary.

The tuned lens is the logit lens on translated states, so the states are translated here and then
scored by the logit lens's own code (``analyses.activations.logit_lens``): the two lenses differ only by the
translators.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from unlearn_lens.tuned_lens.questions import ClozeData, LetterData

SCORINGS = ("letter", "cloze")


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
    (``analyses.activations.logit_lens``: final norm once, in float32; letter = argmax over the four letter
    logits at the last token; cloze = argmax over choices of the mean continuation log-prob).
    """
    from analyses.activations import logit_lens

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
