"""WMDP questions as gathered hidden states: what the scoring reads, whoever gathered them.

``model_data`` fills these by running the model, ``cache_data`` from the activation cache; the
two paths give equal arrays, so the scoring cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
