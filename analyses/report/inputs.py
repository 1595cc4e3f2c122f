"""Where a report's inputs live: ``ReportInputs``, ``discover`` of an output tree, and the readers.

Reading never fails on a missing or broken file: it gives no rows / an empty dict, so a partial
run still makes a report (its cells read as a dash). Only folders marked complete are read: a
folder whose producer is still running, was killed, or is being rewritten from other inputs reads
as empty, and ``unfinished_folders`` names them so the report can say what it left out.
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


#: the output folders the report reads; each counts only once marked complete
REPORTED_FOLDERS = frozenset(outputs.COMPARISON_FOLDERS + outputs.MODEL_FOLDERS)


def finished(folder: Path) -> bool:
    """False for a report folder without its completion marker (other files are read as they are)."""
    return folder.name not in REPORTED_FOLDERS or outputs.is_complete(folder)


def unfinished_folders(inputs: ReportInputs) -> list[Path]:
    """Every report folder present under the tree but not marked complete (left out of the report)."""
    places = [(inputs.comparison_dir(name), outputs.COMPARISON_FOLDERS) for name in inputs.comparisons]
    places += [(inputs.model_dir(model), outputs.MODEL_FOLDERS) for model in [inputs.base, *inputs.comparisons]]
    return [directory / folder for directory, folders in places for folder in folders
            if (directory / folder).is_dir() and not outputs.is_complete(directory / folder)]


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows as dicts; none when the file is missing or its folder is not marked complete."""
    if not path.is_file() or not finished(path.parent):
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_json(path: Path) -> dict:
    """A JSON file's object; empty when it is missing, unreadable or its folder is not marked complete."""
    if not finished(path.parent):
        return {}
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
