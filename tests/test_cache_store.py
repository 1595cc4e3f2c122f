"""The torch-free store: layout alignment, write/read round trips, stacking, verify (no model)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cache_store import CacheWriter, Dynamic, SplitLayout, is_complete, list_splits, open_cache, open_caches
from unlearn_lens.core.errors import UserError

LAYERS, HIDDEN = 3, 8


def test_layout_aligns_blocks_to_chunks():
    lengths = np.array([5, 9, 1, 30, 7, 7, 2])
    layout = SplitLayout(lengths, block_samples=3, token_chunk=8)
    assert layout.n_blocks == 3
    assert all(start % 8 == 0 for start in layout.block_starts)
    assert layout.n_real_tokens == lengths.sum()
    for block in range(layout.n_blocks):
        first, stop = layout.block_sample_range(block)
        t0, t1 = layout.block_token_range(block)
        assert layout.offsets[first] == t0
        assert layout.offsets[stop - 1] + lengths[stop - 1] <= t1 < layout.offsets[stop - 1] + lengths[stop - 1] + 8
    # samples are contiguous and never overlap
    ends = layout.offsets + lengths
    assert (layout.offsets[1:] >= ends[:-1]).all()
    arrays = layout.token_arrays()
    assert arrays["attention_mask"].sum() == lengths.sum()
    assert arrays["token_position"][layout.offsets[3] + 29] == 29 and arrays["token_sample"][layout.offsets[3]] == 3
    shards = [list(layout.shard_blocks(k, 2)) for k in (1, 2)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 2] and not set(shards[0]) & set(shards[1])
    with pytest.raises(UserError):
        SplitLayout(np.array([3, 0]), 2, 8)


PROVENANCE = {"family": "llama", "num_layers": LAYERS - 1, "hidden_size": HIDDEN, "weights_fingerprint": "w1",
              "tokenizer_fingerprint": "t1", "data_manifest_hash": "d1", "max_length": 64, "dtype": "float32",
              "model_dtype": "float32", "model": "synthetic", "final_norm_kind": "rmsnorm", "final_norm_eps": 1e-5}


def synthetic_split(lengths, seed=0, ids_seed=0):
    rng = np.random.default_rng(seed)
    ids_rng = np.random.default_rng(ids_seed)
    token_ids = [ids_rng.integers(0, 100, n).astype(np.int32) for n in lengths]
    resid = [rng.normal(size=(LAYERS, n, HIDDEN)).astype(np.float32) for n in lengths]
    mlp = [rng.normal(size=(LAYERS - 1, n, HIDDEN)).astype(np.float32) for n in lengths]
    return token_ids, resid, mlp


def write_synthetic(url, lengths, *, provenance=PROVENANCE, seed=0, ids_seed=0, batch=2, stop_after=None,
                    overwrite=False, split="forget", block_samples=3, token_chunk=8, threads=1, codec="zstd1"):
    """Write a split of random activations the way capture does; returns the inputs."""
    from cache_store.writer import content_fingerprint

    token_ids, resid, mlp = synthetic_split(lengths, seed, ids_seed)
    layout = SplitLayout(np.array(lengths), block_samples=block_samples, token_chunk=token_chunk)
    input_ids = np.zeros(layout.n_tokens, np.int32)
    for start, ids in zip(layout.offsets, token_ids):
        input_ids[start:start + len(ids)] = ids
    static = {"input_ids": (("token",), input_ids),
              **{k: (("token",), v) for k, v in layout.token_arrays().items()},
              "sample_offset": (("sample",), layout.offsets), "sample_length": (("sample",), layout.lengths.astype(np.int32))}
    dynamic = {"resid": Dynamic(("layer", "token", "hidden"), "float32"),
               "mlp_in": Dynamic(("mlp_layer", "token", "hidden"), "float32"),
               "last": Dynamic(("layer", "sample", "hidden"), "float32")}
    sizes = {"layer": LAYERS, "mlp_layer": LAYERS - 1, "hidden": HIDDEN, "token": layout.n_tokens,
             "sample": layout.n_samples}
    writer = CacheWriter(url, provenance, overwrite=overwrite, codec=codec).open_split(
        split, layout, sizes=sizes, static=static, dynamic=dynamic,
        attrs={"content_fingerprint": content_fingerprint(np.concatenate(token_ids))}, threads=threads)
    writer.start()
    written = 0
    for block in writer.pending_blocks():
        first, stop = layout.block_sample_range(block)
        for start in range(first, stop, batch):
            end = min(start + batch, stop)
            writer.submit(block, {"resid": np.concatenate(resid[start:end], axis=1),
                                  "mlp_in": np.concatenate(mlp[start:end], axis=1),
                                  "last": np.stack([r[:, -1] for r in resid[start:end]], axis=1)})
        writer.end_block(block)
        written += 1
        if stop_after is not None and written >= stop_after:
            writer.close()
            return token_ids, resid, mlp
    writer.close()
    writer.finalize_if_done()
    return token_ids, resid, mlp


LENGTHS = [5, 9, 1, 30, 7, 7, 2, 11]


def test_round_trip_drops_slack_and_keeps_values(tmp_path):
    url = str(tmp_path / "c.zarr")
    token_ids, resid, mlp = write_synthetic(url, LENGTHS)
    assert is_complete(url) and list_splits(url) == ["forget"]
    ds = open_cache(url, "forget")
    assert ds.sizes == {"layer": LAYERS, "mlp_layer": LAYERS - 1, "token": sum(LENGTHS), "sample": len(LENGTHS),
                        "hidden": HIDDEN, "text_token": sum(LENGTHS)}  # a full capture: text_token = token
    np.testing.assert_array_equal(ds.resid.values, np.concatenate(resid, axis=1))
    np.testing.assert_array_equal(ds.mlp_in.values, np.concatenate(mlp, axis=1))
    np.testing.assert_array_equal(ds.input_ids.values, np.concatenate(token_ids))
    np.testing.assert_array_equal(ds.sample_offset.values, np.concatenate([[0], np.cumsum(LENGTHS)[:-1]]))
    assert (ds.attention_mask.values == 1).all()
    np.testing.assert_array_equal(ds["last"].values, np.stack([r[:, -1] for r in resid], axis=1))
    assert list(ds.layer.values) == list(range(LAYERS)) and ds.attrs["complete"] is True
    assert ds.attrs["weights_fingerprint"] == "w1" and ds.attrs["split"] == "forget"
    # one layer reads only that layer's chunks: the dask chunks are (1, token_chunk-ish, hidden)
    assert all(c == 1 for c in ds.resid.chunks[0]) and ds.resid.chunks[2] == (HIDDEN,)
    raw = open_cache(url, "forget", keep_slack=True)
    assert raw.sizes["token"] > sum(LENGTHS) and int(raw.attention_mask.sum()) == sum(LENGTHS)
    scan = open_cache(url, "forget", layers_per_chunk=2)
    assert scan.resid.chunks[0] == (2, 1) and scan.mlp_in.chunks[0] == (2,)
    for name in ("resid", "mlp_in", "last", "input_ids", "attention_mask", "sample_offset"):
        np.testing.assert_array_equal(scan[name].values, ds[name].values)


def test_scan_layers_per_chunk_known_answers():
    from cache_store.reader import scan_layers_per_chunk

    # SmolLM2-like: 1024 tokens x 576 x float16 = 1.2 MB per stored chunk -> 7 layers per 8 MB task
    assert scan_layers_per_chunk(1024, 576, 2, 31) == 7
    # 7B-like: a layer's float64 d x d partial (134 MB) already exceeds the 64 MB budget -> 1 layer
    assert scan_layers_per_chunk(512, 4096, 2, 33) == 1
    # never more layers than the cache has, never fewer than one
    assert scan_layers_per_chunk(8, 16, 4, 3) == 3 and scan_layers_per_chunk(10**6, 576, 4, 31) == 1


def test_block_filling_whole_chunks_exactly(tmp_path):
    """A block whose tokens end exactly on a chunk boundary leaves nothing to pad (regression)."""
    lengths = [4, 4, 8, 3, 5]  # blocks of 2 samples: 8, 8+3=11, 5 tokens; chunk 8
    url = str(tmp_path / "exact.zarr")
    token_ids, resid, _ = write_synthetic(url, lengths, batch=1, block_samples=2)
    ds = open_cache(url, "forget")
    np.testing.assert_array_equal(ds.resid.values, np.concatenate(resid, axis=1))
    np.testing.assert_array_equal(ds.input_ids.values, np.concatenate(token_ids))


def test_memory_url_round_trip():
    url = "memory://store-test/round.zarr"
    _, resid, _ = write_synthetic(url, LENGTHS)
    np.testing.assert_array_equal(open_cache(url, "forget").resid.values, np.concatenate(resid, axis=1))


def test_incomplete_cache_is_refused_then_resumed(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_synthetic(url, LENGTHS, stop_after=1)
    assert not is_complete(url)
    with pytest.raises(UserError, match="incomplete"):
        open_cache(url, "forget")
    assert open_cache(url, "forget", allow_incomplete=True).attrs["complete"] is False
    _, resid, _ = write_synthetic(url, LENGTHS)  # resumes the remaining blocks
    np.testing.assert_array_equal(open_cache(url, "forget").resid.values, np.concatenate(resid, axis=1))


def test_other_provenance_needs_overwrite(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_synthetic(url, LENGTHS)
    other = {**PROVENANCE, "weights_fingerprint": "w2"}
    with pytest.raises(UserError, match="weights_fingerprint.*--overwrite"):
        write_synthetic(url, LENGTHS, provenance=other)
    with pytest.raises(UserError, match="--overwrite"):
        write_synthetic(url, LENGTHS[:-1])
    write_synthetic(url, LENGTHS, provenance=other, seed=3, overwrite=True)
    assert open_cache(url, "forget").attrs["weights_fingerprint"] == "w2"


def test_open_caches_stacks_models_and_checks_token_ids(tmp_path):
    base, unlearned, other = (str(tmp_path / f"{n}.zarr") for n in ("base", "unl", "other"))
    _, resid_a, _ = write_synthetic(base, LENGTHS, seed=0)
    _, resid_b, _ = write_synthetic(unlearned, LENGTHS, seed=1, provenance={**PROVENANCE, "weights_fingerprint": "w2"})
    both = open_caches({"base": base, "unlearned": unlearned}, "forget")
    assert both.resid.dims == ("model", "layer", "token", "hidden")
    assert list(both.model.values) == ["base", "unlearned"] and both.input_ids.dims == ("token",)
    np.testing.assert_array_equal(both.resid.sel(model="unlearned").values, np.concatenate(resid_b, axis=1))
    assert both.attrs["models"]["unlearned"]["weights_fingerprint"] == "w2"
    write_synthetic(other, LENGTHS, ids_seed=5)
    with pytest.raises(UserError, match="different token ids"):
        open_caches({"base": base, "other": other}, "forget")
    data2 = str(tmp_path / "d2.zarr")
    write_synthetic(data2, LENGTHS, provenance={**PROVENANCE, "data_manifest_hash": "d2"})
    with pytest.raises(UserError, match="different data"):
        open_caches({"base": base, "d2": data2}, "forget")


def test_verify_finds_corruption_and_missing_chunks(tmp_path):
    from cache_store.inspect import describe, verify

    url = tmp_path / "c.zarr"
    write_synthetic(str(url), LENGTHS)
    assert verify(str(url)) == []
    report = describe(str(url))["splits"]["forget"]
    assert report["complete"] and report["tokens_real"] == sum(LENGTHS) and report["compression_ratio"] > 0
    chunks = sorted(p for p in (url / "forget" / "resid" / "c").rglob("*") if p.is_file())
    chunks[1].write_bytes(b"\x00garbage")
    chunks[2].unlink()
    problems = verify(str(url))
    key = lambda p: "forget/" + p.relative_to(url / "forget").as_posix()  # noqa: E731
    assert f"{key(chunks[1])}: damaged chunk (checksum mismatch)" in problems
    assert f"{key(chunks[2])}: missing chunk" in problems


def test_verify_finds_inconsistent_offsets_and_bad_last(tmp_path):
    import zarr

    from cache_store.inspect import verify

    url = tmp_path / "c.zarr"
    write_synthetic(str(url), LENGTHS)
    group = zarr.open_group(str(url), mode="r+")["forget"]
    group["last"][0, 0] = np.full(HIDDEN, 7.0, np.float32)
    assert any("'last' disagrees" in p for p in verify(str(url)))
    group["token_sample"][3] = 5
    assert any("token_sample" in p for p in verify(str(url)))


def test_store_package_is_torch_free():
    code = ("import sys, cache_store, cache_store.commands, cache_store.inspect, cache_store.reader; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'nnsight')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_writer_errors_reach_the_producer(tmp_path):
    """A failure in the writer thread is raised in the capture loop, and the thread still stops."""
    from cache_store.writer import content_fingerprint

    layout = SplitLayout(np.array([4, 4]), block_samples=2, token_chunk=8)
    writer = CacheWriter(str(tmp_path / "c.zarr"), PROVENANCE).open_split(
        "forget", layout, sizes={"layer": LAYERS, "token": layout.n_tokens, "hidden": HIDDEN, "sample": 2},
        static={}, dynamic={"resid": Dynamic(("layer", "token", "hidden"), "float32")},
        attrs={"content_fingerprint": content_fingerprint(np.zeros(8))})
    writer.start()
    writer.submit(0, {"resid": np.zeros((LAYERS, 20, HIDDEN), np.float32)})  # more tokens than the block holds
    with pytest.raises(ValueError, match="more tokens"):
        writer.drain()
    writer.close()
    assert writer._thread is None and not writer.done_blocks().any()


# --- integrity: checksums, damaged chunks named, damaged blocks recaptured ------------------------

def flip_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_chunk_carries_a_crc32c_checksum(tmp_path):
    import json

    from cache_store.integrity import checksum_ok

    url = tmp_path / "c.zarr"
    write_synthetic(str(url), LENGTHS)
    for meta in (url / "forget").glob("*/zarr.json"):
        codecs = [codec["name"] for codec in json.loads(meta.read_text())["codecs"]]
        assert codecs == ["bytes", "zstd", "crc32c"], (meta, codecs)
    chunks = [p for p in (url / "forget").rglob("c/*") if p.is_file()]
    assert chunks and all(checksum_ok(p.read_bytes()) for p in chunks)
    assert not checksum_ok(b"\x00" * 12)


def test_flipped_byte_is_named_refused_and_recaptured(tmp_path):
    import shutil

    from cache_store.integrity import name_damaged_chunks, reset_damaged
    from cache_store.inspect import verify

    clean, url = tmp_path / "clean.zarr", tmp_path / "c.zarr"
    write_synthetic(str(clean), LENGTHS)
    shutil.copytree(clean, url)
    chunk = url / "forget" / "resid" / "c" / "1" / "2" / "0"  # layer 1, tokens 16:24 (block 1)
    flip_middle_byte(chunk)
    damaged: list[str] = []
    assert verify(str(url), damaged=damaged) == ["forget/resid/c/1/2/0: damaged chunk (checksum mismatch)"]
    assert damaged == ["forget/resid/c/1/2/0"]
    with pytest.raises(ValueError, match="checksum"):  # the decoder refuses: no silently wrong value
        open_cache(str(url), "forget").resid.values
    with pytest.raises(UserError, match=r"chunk forget/resid/c/1/2/0 is damaged"), name_damaged_chunks([str(url)]):
        open_cache(str(url), "forget").resid.sum().compute()
    assert reset_damaged(str(url), damaged) == {"forget": {"blocks": [1], "static": False}}
    assert not is_complete(str(url))
    write_synthetic(str(url), LENGTHS)  # the same capture resumes the reset block only
    assert verify(str(url)) == []
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert files(url) == files(clean)


def test_damaged_static_chunk_is_rewritten_by_the_capture(tmp_path):
    import shutil

    from cache_store.integrity import reset_damaged
    from cache_store.inspect import verify

    clean, url = tmp_path / "clean.zarr", tmp_path / "c.zarr"
    write_synthetic(str(clean), LENGTHS)
    shutil.copytree(clean, url)
    flip_middle_byte(url / "forget" / "input_ids" / "c" / "0")
    damaged: list[str] = []
    assert verify(str(url), damaged=damaged) == ["forget/input_ids/c/0: damaged chunk (checksum mismatch)"]
    assert reset_damaged(str(url), damaged) == {"forget": {"blocks": [], "static": True}}
    write_synthetic(str(url), LENGTHS)
    assert verify(str(url)) == []
    assert (url / "forget" / "input_ids" / "c" / "0").read_bytes() == (clean / "forget" / "input_ids" / "c" / "0").read_bytes()


def test_cache_without_checksums_still_opens_and_verify_says_so(tmp_path, monkeypatch):
    from zarr.codecs import ZstdCodec

    from cache_store import writer
    from cache_store.inspect import verify

    url = str(tmp_path / "old.zarr")
    monkeypatch.setattr(writer, "compressors", lambda codec="zstd1": [ZstdCodec(level=1)])  # what format 1 wrote
    _, resid, _ = write_synthetic(url, LENGTHS)
    monkeypatch.undo()
    np.testing.assert_array_equal(open_cache(url, "forget").resid.values, np.concatenate(resid, axis=1))
    notes: list[str] = []
    assert verify(url, notes=notes) == []
    assert len(notes) == 1 and "forget: no checksums in" in notes[0] and "resid" in notes[0]


def test_block_done_is_written_only_for_done_blocks(tmp_path):
    """Per-block progress keys: a shard never writes another shard's block_done chunk."""
    url = tmp_path / "c.zarr"
    write_synthetic(str(url), LENGTHS, stop_after=1)  # blocks of 3 samples: 3 blocks, 1 done
    assert sorted(p.name for p in (url / "forget" / "block_done" / "c").iterdir()) == ["0"]



def test_creating_a_split_again_keeps_every_chunk(tmp_path):
    """A second creation (another shard, or a killed one redone) rewrites identical bytes and
    deletes nothing, all-zero chunks included (zarr would drop those from an array it opened)."""
    import zarr

    from cache_store.writer import content_fingerprint

    url = tmp_path / "c.zarr"
    layout = SplitLayout(np.array([4, 4]), block_samples=2, token_chunk=8)

    def create():
        return CacheWriter(str(url), PROVENANCE).open_split(
            "forget", layout, sizes={"layer": LAYERS, "token": layout.n_tokens, "hidden": HIDDEN, "sample": 2},
            static={"zeros": (("sample",), np.zeros(2, np.float32))},
            dynamic={"resid": Dynamic(("layer", "token", "hidden"), "float32")},
            attrs={"content_fingerprint": content_fingerprint(np.zeros(8))})

    create()
    zarr.open_group(str(url), mode="r+")["forget"].attrs["initialised"] = False  # as if mid-creation
    writer = create()
    assert (url / "forget" / "zeros" / "c" / "0").is_file()
    writer.start()
    writer.submit(0, {"resid": np.zeros((LAYERS, 8, HIDDEN), np.float32)})
    writer.end_block(0)
    writer.close()
    assert (url / "forget" / "resid" / "c" / "0" / "0" / "0").is_file()  # an all-zero block, resumed writer


# --- the writer: zarr's bytes, from any number of threads -------------------------------------------

def files(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("codec", ["zstd1", "none"])
def test_chunks_encoded_by_the_writer_are_the_bytes_zarr_writes(tmp_path, codec):
    import zarr

    from cache_store.chunks import ChunkCodec
    from cache_store.writer import compressors

    rng = np.random.default_rng(0)
    for dtype, shape, chunks in (("float16", (3, 40, 8), (1, 16, 8)), ("float32", (10, 4), (4, 4)),
                                 ("uint8", (5,), (1,)), ("int32", (37,), (16,))):
        values = (rng.normal(size=shape) * 100).astype(dtype)
        array = zarr.create_array(zarr.storage.LocalStore(tmp_path / f"{dtype}.zarr"), shape=shape, chunks=chunks,
                                  dtype=dtype, fill_value=0, compressors=compressors(codec),
                                  config={"write_empty_chunks": True})
        array[...] = values
        codec_ = ChunkCodec(array)
        assert codec_.supported
        for coords in np.ndindex(*array.cdata_shape):
            selection = tuple(slice(c * n, min((c + 1) * n, size)) for c, n, size in zip(coords, chunks, shape))
            stored = (tmp_path / f"{dtype}.zarr" / codec_.key(coords)).read_bytes()
            assert codec_.encode(values[selection]) == stored, (dtype, coords)  # edge chunks padded as zarr does


def test_writer_threads_and_codecs_write_the_same_values(tmp_path):
    one, four = tmp_path / "one.zarr", tmp_path / "four.zarr"
    _, resid, mlp = write_synthetic(str(one), LENGTHS, threads=1)
    write_synthetic(str(four), LENGTHS, threads=4, batch=3)
    assert files(one) == files(four)  # the same bytes whatever the threads (and batches)
    raw = tmp_path / "raw.zarr"
    write_synthetic(str(raw), LENGTHS, threads=2, codec="none")
    ds = open_cache(str(raw), "forget")
    np.testing.assert_array_equal(ds.resid.values, np.concatenate(resid, axis=1))
    np.testing.assert_array_equal(ds.mlp_in.values, np.concatenate(mlp, axis=1))
    from cache_store.inspect import verify

    assert verify(str(raw)) == []


# --- a missing chunk is damage (issue 25) -----------------------------------------------------------

@pytest.mark.parametrize("chunk", ["resid/c/1/2/0", "input_ids/c/0", "last/c/2/1/0", "block_done/c/1"])
def test_missing_chunk_is_named_refused_reset_and_recaptured(tmp_path, chunk):
    import shutil

    from cache_store.integrity import reset_damaged
    from cache_store.inspect import verify
    from cache_store.metadata_store import MissingChunkError

    clean, url = tmp_path / "clean.zarr", tmp_path / "c.zarr"
    write_synthetic(str(clean), LENGTHS)
    shutil.copytree(clean, url)
    (url / "forget" / chunk).unlink()
    key = f"forget/{chunk}"
    damaged: list[str] = []
    assert verify(str(url), damaged=damaged) == [f"{key}: missing chunk"] and damaged == [key]
    if not chunk.startswith("block_done"):  # readers never read progress records
        with pytest.raises(MissingChunkError, match=f"chunk {key} is missing.*--reset-damaged"):
            ds = open_cache(str(url), "forget")
            ds[chunk.split("/")[0]].values
    reset = reset_damaged(str(url), damaged)
    assert reset == {"forget": {"blocks": [] if chunk.startswith("input_ids") else [1],
                                "static": chunk.startswith("input_ids")}}
    assert not is_complete(str(url))
    write_synthetic(str(url), LENGTHS)  # the same capture rewrites what was reset
    assert verify(str(url)) == [] and files(url) == files(clean)


def test_missing_chunk_stops_a_computation_in_one_line(tmp_path):
    from cache_store.integrity import name_damaged_chunks

    url = tmp_path / "c.zarr"
    write_synthetic(str(url), LENGTHS)
    (url / "forget" / "mlp_in" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(UserError) as caught, name_damaged_chunks([str(url)]):
        open_cache(str(url), "forget", layers_per_chunk="scan").mlp_in.sum().compute()
    assert "chunk forget/mlp_in/c/0/0/0 is missing" in str(caught.value) and "\n" not in str(caught.value)


# --- nothing outside a cache is written into or deleted (issue 25) ----------------------------------

def test_a_folder_that_holds_no_cache_is_never_touched(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds no activation cache .*notes.txt.*nothing there was changed"):
            write_synthetic(str(folder), LENGTHS, overwrite=overwrite)
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        write_synthetic(str(tmp_path / "file"), LENGTHS)


def test_overwrite_replaces_only_the_cache(tmp_path):
    url = tmp_path / "c.zarr"
    write_synthetic(str(url), LENGTHS)
    (url / "README.txt").write_text("kept")  # a user's file inside the cache's folder
    other = {**PROVENANCE, "weights_fingerprint": "w2"}
    write_synthetic(str(url), LENGTHS, provenance=other, seed=4, overwrite=True)
    assert (url / "README.txt").read_text() == "kept"
    assert open_cache(str(url), "forget").attrs["weights_fingerprint"] == "w2"
    from cache_store.store import remove_cache

    remove_cache(str(url))
    assert sorted(p.name for p in url.iterdir()) == ["README.txt"]


def test_background_writer_threads_yield_to_the_forward():
    """On a CPU device the writer threads run at a lower priority than the capture loop (nice is per
    thread on Linux), so they take the cores the forward leaves idle."""
    import os
    import threading

    from cache_store.split_writer import BACKGROUND_NICENESS, _background

    if not hasattr(os, "getpriority"):
        pytest.skip("no thread priorities on this platform")
    before, seen = os.getpriority(os.PRIO_PROCESS, 0), {}

    def writer_thread():
        _background()
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, 0)

    thread = threading.Thread(target=writer_thread)
    thread.start()
    thread.join()
    assert seen["writer"] == min(19, before + BACKGROUND_NICENESS) and os.getpriority(os.PRIO_PROCESS, 0) == before
