"""The names of a data directory's files and its content hash: what ``data`` and ``testbed`` both write.

A leaf module (standard library only), so the data sets' two writers share one declaration of each name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FILES = {"forget": "forget.txt", "retain": "retain.txt", "wmdp": "wmdp_mcq.jsonl"}
#: Optional: questions about the retain set (same format), scored as retain-facts accuracy (the testbed writes it).
RETAIN_MCQ_FILE = "retain_mcq.jsonl"
MANIFEST = "manifest.json"
#: The built-in offline demo data (passages and questions written for this project).
DEMO_DIR = Path(__file__).with_name("demo_data")


def files_hash(files: dict[str, str]) -> str:
    """The content hash of a data directory from its files' SHA-256 (what ``manifest.json`` holds)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def sha256(path: Path) -> str:
    """A file's SHA-256 (hex)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
