"""A cache's identity: what it was captured from, as its capture recorded it (see SCHEMA.md).

The recorded fingerprints are computed from content at capture (the weights' bytes, the token ids
of each split), so two caches with the same identity hold activations of the same weights on the
same tokens. An output made from caches records their identities in its completion marker
(``unlearn_lens.core.identity``); a cache recaptured from other weights or data changes them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from cache_store import store as stores

#: root attributes that say what a cache was captured from
ROOT_KEYS = ("model", "revision", "family", "num_layers", "hidden_size", "weights_fingerprint",
             "checkpoint_fingerprint", "tokenizer_fingerprint", "data_manifest_hash", "max_length", "dtype",
             "model_dtype")
#: split attributes that say which tokens a split holds and how they are laid out
SPLIT_KEYS = ("content_fingerprint", "layout_fingerprint", "n_samples", "complete")


def identity_of(splits: Mapping[str, Mapping[str, Any]]) -> str:
    """A short hash of the recorded identity of a cache's splits (``{split: attributes}``; a split's
    attributes may include the root's, as ``open_cache`` gives them)."""
    record = {split: {key: attrs.get(key) for key in ROOT_KEYS + SPLIT_KEYS}
              for split, attrs in sorted(splits.items())}
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_identity(url: str) -> str | None:
    """``identity_of`` the cache at ``url`` read from its metadata (one document), None when there is none."""
    if not stores.exists(url):
        return None
    root = stores.open_root(url, consolidated=None)
    shared = dict(root.attrs)
    return identity_of({split: {**shared, **dict(root[split].attrs)} for split in root.group_keys()})
