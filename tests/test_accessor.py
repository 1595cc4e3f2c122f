"""``ds.ulens``: ragged per-sample selections against the raw arrays, and text decoded through the
tokenizer the cache's provenance names (checked against its fingerprint, transformers-free)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cache_store
from cache_store import open_cache, open_caches
from test_analyze_runner import blocked_env
from test_cache_store import HIDDEN, LAYERS, LENGTHS, write_synthetic
from unlearn_lens.core.errors import UserError


def test_sample_slices_every_token_variable(tmp_path):
    import zarr

    url = str(tmp_path / "c.zarr")
    token_ids, resid, mlp = write_synthetic(url, LENGTHS)  # blocks of 3 samples, 8-token chunks: slack
    ds = open_cache(url, "forget")
    raw = open_cache(url, "forget", keep_slack=True)
    group = zarr.open_group(url, mode="r")["forget"]
    disk_offsets = group["sample_offset"][:]
    for i, n in enumerate(LENGTHS):
        one = ds.ulens.sample(i)
        assert one.sizes == {"layer": LAYERS, "mlp_layer": LAYERS - 1, "token": n, "hidden": HIDDEN, "text_token": n}
        np.testing.assert_array_equal(one.resid.values, resid[i])
        np.testing.assert_array_equal(one.mlp_in.values, mlp[i])
        np.testing.assert_array_equal(one["last"].values, resid[i][:, -1])  # sample-indexed: at i
        np.testing.assert_array_equal(one.token_position.values, np.arange(n))
        assert (one.token_sample.values == i).all() and int(one.sample) == i and int(one.sample_length) == n
        np.testing.assert_array_equal(ds.ulens.tokens_of(i), token_ids[i])
        # the same sample from the on-disk axis (slack kept) and straight from the zarr arrays
        start = int(disk_offsets[i])
        np.testing.assert_array_equal(raw.ulens.tokens_of(i), group["input_ids"][start:start + n])
        np.testing.assert_array_equal(raw.ulens.sample(i).resid.values, group["resid"][:, start:start + n])
        assert raw.ulens.token_slice(i) == slice(start, start + n)
    np.testing.assert_array_equal(ds.ulens.tokens_of(-1), token_ids[-1])
    with pytest.raises(UserError, match="out of range: this split has 8 samples"):
        ds.ulens.sample(len(LENGTHS))
    with pytest.raises(UserError, match="sample_offset"):
        ds.drop_vars("sample_offset").ulens.tokens_of(0)


def test_sample_keeps_the_model_dimension_of_open_caches(tmp_path):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    _, resid_a, _ = write_synthetic(a, LENGTHS, seed=0)
    _, resid_b, _ = write_synthetic(b, LENGTHS, seed=1)
    both = open_caches({"a": a, "b": b}, "forget")
    one = both.ulens.sample(3)
    assert one.resid.dims == ("model", "layer", "token", "hidden") and one.sizes["token"] == LENGTHS[3]
    np.testing.assert_array_equal(one.resid.sel(model="b").values - one.resid.sel(model="a").values,
                                  resid_b[3] - resid_a[3])


def test_accessor_is_registered_by_importing_cache_store():
    code = ("import xarray as xr, cache_store; assert hasattr(xr.Dataset(), 'ulens'); import sys; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'nnsight')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    import xarray as xr

    assert isinstance(xr.Dataset().ulens, cache_store.accessor.UlensAccessor)


def test_text_round_trips_through_the_capture_tokenizer(tiny_cache_pair):
    from transformers import AutoTokenizer

    from cache_store.tokenizer_id import directory_fingerprints, tokenizer_fingerprint
    from unlearn_lens.data import read_texts

    base = tiny_cache_pair["models"]["base"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    ds = open_cache(str(tiny_cache_pair["caches"]["base"]), "forget")
    # the fingerprint recomputed from the files alone is the one capture recorded from the loaded tokenizer
    assert ds.attrs["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert ds.attrs["tokenizer_fingerprint"] in directory_fingerprints(base)
    texts = read_texts(tiny_cache_pair["data"], "forget")
    assert ds.sizes["sample"] == len(texts)
    for i, original in enumerate(texts):
        ids = tokenizer(original)["input_ids"]
        np.testing.assert_array_equal(ds.ulens.tokens_of(i), ids)
        assert ds.ulens.text(i) == tokenizer.decode(ids)  # found from attrs["model_path"]
        assert ds.ulens.text(i, skip_special_tokens=True) == original  # byte-level BPE round-trips exactly
    assert ds.ulens.text(2, tokenizer=tokenizer) == texts[2]
    assert ds.ulens.text(2, tokenizer=str(base)) == texts[2]
    both = open_caches({name: str(url) for name, url in tiny_cache_pair["caches"].items()}, "retain")
    assert both.ulens.text(1, skip_special_tokens=True) == read_texts(tiny_cache_pair["data"], "retain")[1]


def test_text_without_or_with_another_tokenizer_is_one_clear_error(tiny_cache_pair, tmp_path):
    from transformers import AutoTokenizer

    base = tiny_cache_pair["models"]["base"]
    ds = open_cache(str(tiny_cache_pair["caches"]["base"]), "retain")
    expected = ds.ulens.text(0)

    moved = ds.copy()
    moved.attrs = {**ds.attrs, "model_path": str(tmp_path / "gone")}
    with pytest.raises(UserError, match=r"no tokenizer.json found for this cache \(looked in: .*gone\); pass one"):
        moved.ulens.text(0)
    gguf = tmp_path / "model.gguf"  # a single-file model without a tokenizer.json beside it
    gguf.write_bytes(b"GGUF")
    moved.attrs["model_path"] = str(gguf)
    with pytest.raises(UserError, match=f"looked in: {tmp_path}\\)"):
        moved.ulens.text(0)
    moved.attrs["model_path"] = str(base / "model.safetensors")  # a file: its folder's tokenizer is used
    assert moved.ulens.text(0) == expected
    del moved.attrs["model_path"]
    with pytest.raises(UserError, match="no model_path"):
        moved.ulens.text(0)

    other = tmp_path / "other"  # same files with one special token renamed: another fingerprint
    shutil.copytree(base, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|endoftext|>"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match the cache's tokenizer_fingerprint"):
        ds.ulens.text(0, tokenizer=str(other))
    with pytest.raises(UserError, match="does not match"):
        ds.ulens.text(0, tokenizer=AutoTokenizer.from_pretrained(other))
    assert ds.ulens.text(0, tokenizer=str(other), check_fingerprint=False) == expected


def test_text_needs_no_torch_or_transformers(tiny_cache_pair, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from cache_store import open_cache
        ds = open_cache({str(tiny_cache_pair['caches']['modified'])!r}, "wmdp")
        print(ds.ulens.text(0, skip_special_tokens=True))
        bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'nnsight')]
        assert not bad, bad
    """)
    result = subprocess.run([sys.executable, "-c", script], env=blocked_env(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_cache_pair["models"]["modified"])
    ds = open_cache(str(tiny_cache_pair["caches"]["modified"]), "wmdp")
    assert result.stdout == tokenizer.decode(ds.ulens.tokens_of(0).tolist(), skip_special_tokens=True) + "\n"
    assert "Answer:" in result.stdout
