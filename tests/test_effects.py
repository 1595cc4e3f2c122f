"""``analyses.effects``: what a run did to each metric, against numpy on known per-item results."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.effects import change_lines, changes
from analyses.uncertainty import PER_ITEM


def _record(correct, sums):
    return {PER_ITEM: {"cloze_accuracy": {"correct": list(correct)},
                       "forget_nll": {"sum": list(sums), "count": [2] * len(sums)}}}


def test_changes_are_paired_differences_of_the_token_weighted_means():
    rng = np.random.default_rng(0)
    before_sums, after_sums = rng.uniform(2, 4, 30), rng.uniform(3, 5, 30)
    before = _record([1] * 20 + [0] * 10, before_sums)
    after = _record([1] * 5 + [0] * 25, after_sums)
    found = changes(before, after)
    assert found["cloze_accuracy"].value == pytest.approx(5 / 30 - 20 / 30) and found["cloze_accuracy"].n == 30
    assert found["forget_nll"].value == pytest.approx(after_sums.sum() / 60 - before_sums.sum() / 60)
    assert found["forget_nll"].low < found["forget_nll"].value < found["forget_nll"].high


def test_lines_say_before_after_and_flag_a_change_inside_the_noise():
    same = [3.0, 1.0] * 10
    lines = change_lines(_record([1] * 10 + [0] * 10, same), _record([0] * 10 + [1] * 10, same[::-1]))
    accuracy, nll = lines
    assert accuracy.startswith("cloze_accuracy: 0.500 -> 0.500, change 0.000 [") and "n = 20" in accuracy
    assert accuracy.endswith("(inside the noise)") and nll.endswith("(inside the noise)")
    moved = change_lines(_record([1] * 20, [2.0] * 20), _record([0] * 20, [4.0] * 20))
    assert moved == ["cloze_accuracy: 1.000 -> 0.000, change -1.000 [-1.000, -1.000], n = 20",
                     "forget_nll: 1.000 -> 2.000, change +1.000 [1.000, 1.000], n = 20"]
    assert change_lines({}, {}) == []  # records stored without per-item results: nothing to say
