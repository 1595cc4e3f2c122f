"""Open the caches named on the command line (through ``cache_store``'s public API only)."""

from __future__ import annotations


import xarray as xr

from unlearn_lens.core.errors import UserError
from unlearn_lens.core.outputs import check_model_name

#: Splits every diagnostic but the logit lens reads (required).
SPLITS = ("forget", "retain")
#: Splits the logit lens reads when every model's cache has them.
LENS_SPLITS = ("wmdp", "wmdp_cloze")
#: Splits analyze reads when a cache has them (forget and retain are required).
WANTED_SPLITS = SPLITS + LENS_SPLITS


def parse_compare(values: tuple[str, ...] | list[str], base_name: str) -> dict[str, str]:
    """``NAME=CACHE`` pairs as an ordered dict; names must be usable as folder names and unique."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise UserError(f"--compare {value!r}: expected NAME=CACHE")
        check_model_name(name, f"--compare {value!r}: NAME")
        if name == base_name or name in pairs:
            raise UserError(f"--compare {value!r}: the name {name!r} is used twice")
        pairs[name] = url
    if not pairs:
        raise UserError("give at least one --compare NAME=CACHE")
    return pairs


def open_model_caches(url: str) -> dict[str, xr.Dataset]:
    """Every analysable split of one model's cache, lazily (refuses a missing or incomplete cache)."""
    import cache_store
    from cache_store import store

    if not store.exists(url):
        raise UserError(f"{url}: no activation cache here (write one with `unlearn-lens capture`)")
    splits = cache_store.list_splits(url)
    return {split: cache_store.open_cache(url, split, layers_per_chunk="scan") for split in WANTED_SPLITS
            if split in splits}
