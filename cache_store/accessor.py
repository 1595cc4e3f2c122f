"""``ds.ulens``: one call for the ragged selections of a cache Dataset (registered on ``import cache_store``).

Samples lie one after another on the flat ``token`` axis (``sample_offset``, ``sample_length``);
the accessor turns "sample i" into the right token slice, so notebooks never do offset arithmetic:

- ``ds.ulens.sample(i)``: the Dataset restricted to sample ``i`` (every token-indexed variable
  sliced to its tokens, every sample-indexed variable at ``i``; still lazy);
- ``ds.ulens.tokens_of(i)``: its token ids (numpy int array; all of them, even in a token-sampled cache);
- ``ds.ulens.text(i)``: those ids decoded by the tokenizer the cache was captured with.

Works on ``open_cache`` (real tokens, or ``keep_slack=True``: offsets then index the on-disk
axis) and on ``open_caches`` (the ``model`` dimension is kept). Torch- and transformers-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from cache_store.tokenizer_id import directory_fingerprints, load_tokenizer_file, tokenizer_file
from unlearn_lens.core.errors import UserError


@xr.register_dataset_accessor("ulens")
class UlensAccessor:
    """Ragged per-sample selections of a cache Dataset (see the module docstring and SCHEMA.md)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def _index(self, i: int) -> int:
        """Sample position ``i`` (negative counts from the end), checked."""
        n = self._ds.sizes.get("sample", 0)
        if "sample_offset" not in self._ds or "sample_length" not in self._ds:
            raise UserError("ds.ulens needs a cache Dataset with sample_offset and sample_length (from open_cache)")
        if not -n <= int(i) < n:
            raise UserError(f"sample {i} out of range: this split has {n} samples")
        return int(i) % n

    def token_slice(self, i: int) -> slice:
        """Positions on the ``token`` axis of sample ``i``'s tokens."""
        i = self._index(i)
        start = int(self._ds["sample_offset"].values[i])
        return slice(start, start + int(self._ds["sample_length"].values[i]))

    def text_slice(self, i: int) -> slice:
        """Positions on the ``text_token`` axis of every token id of sample ``i`` (the ``token`` axis
        where the Dataset has no ``text_token``: ``keep_slack=True`` or a synthetic cache)."""
        if "text_offset" not in self._ds or "text_length" not in self._ds:
            return self.token_slice(i)
        i = self._index(i)
        start = int(self._ds["text_offset"].values[i])
        return slice(start, start + int(self._ds["text_length"].values[i]))

    def sample(self, i: int) -> xr.Dataset:
        """Sample ``i`` alone: token-indexed variables sliced to its tokens, sample-indexed ones at ``i``.

        The ``token`` coordinate keeps the flat indices (``token_position`` says which position of
        the sample each is: 0, 1, ... unless captured with ``--token-sample``), ``text_token`` is cut
        to the sample's token ids; ``sample`` becomes a scalar coordinate. Nothing is read until
        values are used.
        """
        selection = {"token": self.token_slice(i), "sample": self._index(i)}
        if "text_token" in self._ds.dims:
            selection["text_token"] = self.text_slice(i)
        return self._ds.isel(selection)

    def tokens_of(self, i: int) -> np.ndarray:
        """Every token id of sample ``i``, in order (reads only that slice of ``text_input_ids``;
        complete even where ``--token-sample`` kept a few positions' activations)."""
        name = "text_input_ids" if "text_input_ids" in self._ds and "text_offset" in self._ds else "input_ids"
        dim = "text_token" if name == "text_input_ids" else "token"
        return np.asarray(self._ds[name].isel({dim: self.text_slice(i)}).values)

    def text(self, i: int, tokenizer: Any = None, *, skip_special_tokens: bool = False,
             check_fingerprint: bool = True) -> str:
        """Sample ``i``'s tokens decoded back to text.

        ``tokenizer``: any object with ``decode(ids)`` (an HF tokenizer, a ``tokenizers.Tokenizer``)
        or a model directory / ``tokenizer.json`` path. By default the tokenizer is looked up in
        the cache's provenance: ``tokenizer.json`` in the directory of ``attrs["model_path"]``
        (each model's, for ``open_caches``). A tokenizer from a path, or an HF tokenizer object, must
        match the cache's ``tokenizer_fingerprint`` unless ``check_fingerprint=False``. Raises
        ``UserError`` (one line) when no tokenizer can be found or it does not match; never returns None.
        """
        ids = [int(t) for t in self.tokens_of(i)]
        decoder = self.tokenizer(tokenizer, check_fingerprint=check_fingerprint)
        return decoder.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokenizer(self, tokenizer: Any = None, *, check_fingerprint: bool = True):
        """The tokenizer ``text`` decodes with (see there): passed in, or found from the provenance."""
        wanted = self._fingerprints()
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            if check_fingerprint and wanted and hasattr(tokenizer, "special_tokens_map"):
                from cache_store.tokenizer_id import tokenizer_fingerprint

                if tokenizer_fingerprint(tokenizer) not in wanted:
                    raise UserError("the tokenizer passed does not match the cache's tokenizer_fingerprint "
                                    f"({', '.join(sorted(wanted))}); pass check_fingerprint=False to decode anyway")
            return tokenizer
        paths = [Path(tokenizer)] if tokenizer is not None else self._provenance_paths()
        tried = []
        for path in paths:
            if tokenizer_file(path) is None:
                tried.append(str(path))
                continue
            if check_fingerprint and wanted and not directory_fingerprints(path) & wanted:
                raise UserError(f"{path}: its tokenizer does not match the cache's tokenizer_fingerprint "
                                f"({', '.join(sorted(wanted))}); pass check_fingerprint=False to decode anyway")
            return load_tokenizer_file(path)
        where = "; ".join(tried) or "no model_path in the cache's attributes"
        raise UserError(f"no tokenizer.json found for this cache (looked in: {where}); "
                        "pass one: ds.ulens.text(i, tokenizer=<model dir, tokenizer.json or tokenizer object>)")

    def _attr_sets(self) -> list[dict]:
        """The attributes of each model behind the Dataset (one, or each of ``open_caches``)."""
        models = self._ds.attrs.get("models")
        return list(models.values()) if isinstance(models, dict) and models else [self._ds.attrs]

    def _fingerprints(self) -> set[str]:
        return {str(a["tokenizer_fingerprint"]) for a in self._attr_sets() if a.get("tokenizer_fingerprint")}

    def _provenance_paths(self) -> list[Path]:
        """Directories that may hold the capture's tokenizer: each model_path (or its folder for a file)."""
        paths: list[Path] = []
        for attrs in self._attr_sets():
            value = attrs.get("model_path")
            if not value:
                continue
            path = Path(str(value))
            path = path.parent if path.is_file() else path
            if path not in paths:
                paths.append(path)
        return paths
