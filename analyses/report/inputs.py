"""Where a report's inputs live: ``ReportInputs``, ``discover`` of an output tree, and the readers.

Reading never fails on a missing or broken file: it gives no rows / an empty dict, so a partial
run still makes a report (its cells read as a dash).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError


@dataclass
class ReportInputs:
    """Where the outputs live: ``root/<base>__to__<name>/`` and ``root/<model>/``."""

    root: Path
    base: str
    comparisons: list[str]  # names of the modified models
    steps: dict[str, str] = field(default_factory=dict)  # pipeline step -> status

    def comparison_dir(self, name: str) -> Path:
        return outputs.comparison_dir(self.root, self.base, name)

    def model_dir(self, name: str) -> Path:
        return outputs.model_dir(self.root, name)


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows as dicts; none when the file is missing."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_json(path: Path) -> dict:
    """A JSON file's object; empty when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def discover(root: str | Path) -> ReportInputs:
    """Find the comparisons under ``root`` from its ``<base>__to__<name>`` folders."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    pairs = [pair for pair in map(outputs.parse_comparison_name, folders) if pair is not None]
    bases = {base for base, _ in pairs}
    if not pairs:
        raise UserError(f"{root}: no <base>__to__<name> folders to report on")
    if len(bases) > 1:
        raise UserError(f"{root}: several bases ({', '.join(sorted(bases))}); keep one study per output folder")
    return ReportInputs(root, bases.pop(), [name for _, name in pairs])
