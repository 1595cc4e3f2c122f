"""Which tokenizer a cache was captured with: its fingerprint, and finding it again without transformers.

``tokenizer_fingerprint`` hashes a loaded HF tokenizer at capture time (``unlearn_lens.capture.provenance``
records it as the cache's ``tokenizer_fingerprint``). ``directory_fingerprints`` recomputes the
same hash from a model directory's ``tokenizer.json`` and ``tokenizer_config.json`` alone, so a
notebook can check that the tokenizer it found is the one the cache was captured with, torch- and
transformers-free (``tokenizers`` is imported only to decode).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from unlearn_lens.core.errors import UserError

#: Special-token attributes of an HF tokenizer (its ``special_tokens_map`` keys), in HF's order.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                "additional_special_tokens")


def fingerprint_of(definition: dict[str, Any], special: dict[str, Any], class_name: str) -> str:
    """sha256 of a tokenizer definition (the backend's JSON without truncation/padding), its special
    tokens and its class name: the cache's ``tokenizer_fingerprint``."""
    definition = dict(definition)
    definition.pop("truncation", None)
    definition.pop("padding", None)
    definition["special"] = {k: str(v) for k, v in sorted(special.items())}
    definition["class"] = class_name
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Fingerprint of a loaded HF tokenizer (vocabulary, merges, normaliser, special tokens, class)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = json.loads(backend.to_str()) if backend is not None else {"vocab": tokenizer.get_vocab()}
    return fingerprint_of(definition, dict(tokenizer.special_tokens_map), type(tokenizer).__name__)


def tokenizer_file(path: str | Path) -> Path | None:
    """``tokenizer.json`` of a model directory (or the file itself); None when there is none."""
    path = Path(path)
    candidate = path / "tokenizer.json" if path.is_dir() else path
    return candidate if candidate.name.endswith(".json") and candidate.is_file() else None


def directory_fingerprints(path: str | Path) -> set[str]:
    """Fingerprints the HF tokenizer saved at ``path`` has under the class names it may load as.

    The class name is the one part not stored in the files exactly (``tokenizer_config.json`` says
    ``GPT2Tokenizer`` where transformers 4 loads ``GPT2TokenizerFast``, 5 ``TokenizersBackend``),
    so every candidate is returned; an empty set when the directory has no ``tokenizer.json``.
    """
    file = tokenizer_file(path)
    if file is None:
        return set()
    definition = json.loads(file.read_text())
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    special_file = file.parent / "special_tokens_map.json"
    saved = json.loads(special_file.read_text()) if special_file.is_file() else {}
    special = {}
    for key in SPECIAL_KEYS:
        value = config.get(key, saved.get(key))
        if isinstance(value, dict):  # an AddedToken written as a dict: HF's str() of it is its content
            value = value.get("content")
        if value not in (None, [], ""):
            special[key] = value
    declared = str(config.get("tokenizer_class") or "PreTrainedTokenizerFast")
    names = {declared, declared if declared.endswith("Fast") else declared + "Fast",
             "PreTrainedTokenizerFast", "TokenizersBackend"}
    return {fingerprint_of(definition, special, name) for name in names}


def load_tokenizer_file(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a directory's ``tokenizer.json`` (``UserError`` if impossible)."""
    file = tokenizer_file(path)
    if file is None:
        raise UserError(f"{path}: no tokenizer.json there")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("decoding token ids needs the `tokenizers` package (pip install tokenizers), "
                        "or pass a tokenizer object") from None
    return Tokenizer.from_file(str(file))
