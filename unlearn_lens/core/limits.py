"""The smallest value of every count option, written once, and the one check that applies it.

A count flag shared by several commands (``--batch-size``, ``--max-length``...) has its lower
bound here. The click option bundles (``unlearn_lens.options``) give the flag a type that applies
it while the command line is parsed, and each step's run function (called by the pipeline, with
no command line) checks its settings with ``check_counts``: the same rule and the same one-line
message either way. Standard library only, like the rest of the core.
"""

from __future__ import annotations

import math

from unlearn_lens.core.errors import UserError

#: settings field -> (smallest value, why, shown after the message; "" when it goes without saying)
MINIMUM: dict[str, tuple[int, str]] = {
    "batch_size": (1, ""),
    "eval_batch_size": (1, ""),
    "max_samples": (1, ""),
    "max_length": (2, "a text needs a token after the first to be scored"),
    "workers": (1, ""),
}


def flag_of(field: str) -> str:
    """The command-line flag of a settings field (``max_length`` -> ``--max-length``)."""
    return "--" + field.replace("_", "-")


def at_least_message(flag: str, minimum: int | float, value: object, why: str = "") -> str:
    """``--FLAG must be at least N, got V`` (and why, when it is not obvious)."""
    return f"{flag} must be at least {minimum}, got {value}" + (f" ({why})" if why else "")


def check_at_least(flag: str, value: int | float | None, minimum: int | float, why: str = "") -> None:
    """One-line ``UserError`` when ``value`` is below ``minimum``; None (the "all" default) passes."""
    if value is not None and value < minimum:
        raise UserError(at_least_message(flag, minimum, value, why))


def check_count(field: str, value: int | None) -> None:
    """Check one shared count against its rule in ``MINIMUM``."""
    minimum, why = MINIMUM[field]
    check_at_least(flag_of(field), value, minimum, why)


def check_counts(**values: int | None) -> None:
    """Check shared counts by settings field name: ``check_counts(batch_size=8, max_samples=None)``."""
    for field, value in values.items():
        check_count(field, value)


def check_positive(flag: str, value: float | None) -> None:
    """One-line ``UserError`` unless ``value`` is a finite number above zero (a learning rate...)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise UserError(f"{flag} must be a positive number, got {value}")
