"""Capture equals independent HF computations, for every family, and survives kills and shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FORGET = [
    "Viruses replicate inside host cells using the host's machinery and spread quickly.",
    "Bacteria divide by binary fission.",
    "The cell membrane controls what enters and leaves the cell, and proteins fold.",
    "Plasmids carry genes.",
    "Proteins fold into shapes that determine their function in the body and in cells.",
    "Pathogens evolve.",
    "The virus binds a receptor on the cell surface, enters and releases its genome.",
]
RETAIN = [
    "The river flows through the valley toward the distant sea.",
    "Paris is the capital of France.",
    "The orchestra played a symphony by Beethoven to a full hall.",
    "Rain fell.",
    "In 1905 Einstein published papers on relativity.",
]
MCQ = [
    ("Which organelle produces most of the cell's energy?", ["Nucleus", "Mitochondrion", "Ribosome", "Golgi"], 1),
    ("What do viruses need to replicate?", ["A host cell", "Sunlight", "Oxygen only", "Nothing"], 0),
    ("How do bacteria divide?", ["Meiosis", "Budding", "Binary fission", "Spores"], 2),
]


def write_data(path: Path, forget=FORGET, retain=RETAIN, mcq=MCQ) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "forget.txt").write_text("\n".join(forget) + "\n")
    (path / "retain.txt").write_text("\n".join(retain) + "\n")
    records = [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate(mcq)]
    (path / "wmdp_mcq.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (path / "manifest.json").write_text(json.dumps({"hash": "capture-test-data"}))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("capture-data"))


def settings(**overrides):
    from unlearn_lens.capture import CaptureSettings

    base = dict(batch_size=3, block_samples=4, dtype="float32", progress=False, token_chunk=32)
    return CaptureSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tiny_model_dir, data_dir):
    """A float32 capture of every split of the family's tiny model."""
    from unlearn_lens.capture import capture

    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    states = capture(str(tiny_model_dir), data_dir, str(out), settings())
    assert set(states.values()) == {"complete"}
    return out


def reference(model_dir, ids: np.ndarray):
    """HF forward of one unpadded sample: hidden states, MLP inputs (plain hooks), logits."""
    import torch

    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.loading import load_model

    model, _ = load_model(str(model_dir), dtype="float32", with_tokenizer=False)
    adapter = ArchitectureAdapter(model)
    mlp_inputs, last_block = [], []
    hooks = [adapter.mlp(i).register_forward_pre_hook(lambda m, args: mlp_inputs.append(args[0]))
             for i in range(adapter.num_layers)]
    hooks.append(adapter.block(adapter.num_layers - 1).register_forward_hook(
        lambda m, args, out: last_block.append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    L = adapter.num_layers
    resid = [h[0].numpy() for h in out.hidden_states[:L]] + [last_block[0][0].numpy()]
    return np.stack(resid), np.stack([m[0].numpy() for m in mlp_inputs]), out.logits[0].numpy()


def test_residuals_mlp_inputs_and_logits_equal_hf(captured, tiny_model_dir):
    import cache_store
    from unlearn_lens.loading import load_tokenizer
    from unlearn_lens.prompts import letter_prompt, letter_token_ids

    tokenizer = load_tokenizer(str(tiny_model_dir))
    forget = cache_store.open_cache(str(captured), "forget")
    assert forget.sizes["sample"] == len(FORGET)
    assert int(forget["attention_mask"].sum()) == forget.sizes["token"]  # slack dropped
    for index, text in enumerate(FORGET):
        ids = np.asarray(tokenizer(text)["input_ids"])
        start, length = int(forget.sample_offset[index]), int(forget.sample_length[index])
        assert length == len(ids)
        np.testing.assert_array_equal(forget.input_ids[start:start + length].values, ids)
        np.testing.assert_array_equal(forget.token_position[start:start + length].values, np.arange(length))
        assert (forget.token_sample[start:start + length].values == index).all()
        resid, mlp_in, _ = reference(tiny_model_dir, ids)
        # tolerance: F32-ORDER (the cache's batched nnsight trace vs a plain one-sample HF forward)
        np.testing.assert_allclose(forget.resid[:, start:start + length].values, resid, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(forget.mlp_in[:, start:start + length].values, mlp_in, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(forget["last"][:, index].values, resid[:, -1], atol=2e-5, rtol=1e-4)

    wmdp = cache_store.open_cache(str(captured), "wmdp")
    letters = letter_token_ids(tokenizer)
    np.testing.assert_array_equal(wmdp.letter_token_ids.values, letters)
    np.testing.assert_array_equal(wmdp.answer.values, [a for _, _, a in MCQ])
    for index, (question, choices, _) in enumerate(MCQ):
        ids = np.asarray(tokenizer(letter_prompt(question, choices))["input_ids"])
        _, _, logits = reference(tiny_model_dir, ids)
        # tolerance: F32-ORDER (logits: larger magnitudes, 1e-4)
        np.testing.assert_allclose(wmdp.final_letter_logits[index].values, logits[-1, letters], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(wmdp["last"][:, index].values[0],
                                   wmdp.resid[0, int(wmdp.sample_offset[index]) + len(ids) - 1].values)


def test_cloze_boundaries_and_logprobs(captured, tiny_model_dir):
    import torch

    import cache_store
    from unlearn_lens.loading import load_tokenizer
    from unlearn_lens.prompts import cloze_context, cloze_continuations

    tokenizer = load_tokenizer(str(tiny_model_dir))
    cloze = cache_store.open_cache(str(captured), "wmdp_cloze")
    assert cloze.sizes["sample"] == 4 * len(MCQ)
    np.testing.assert_array_equal(cloze.question.values, np.repeat(np.arange(len(MCQ)), 4))
    np.testing.assert_array_equal(cloze.choice_index.values, np.tile(np.arange(4), len(MCQ)))
    for sample in range(cloze.sizes["sample"]):
        question, choices, _ = MCQ[sample // 4]
        context = tokenizer(cloze_context(question))["input_ids"]
        continuation = tokenizer(cloze_continuations(choices)[sample % 4], add_special_tokens=False)["input_ids"]
        assert int(cloze.cont_start[sample]) == len(context)
        assert int(cloze.cont_end[sample]) == len(context) + len(continuation)
        ids = np.asarray(context + continuation)
        _, _, logits = reference(tiny_model_dir, ids)
        logprobs = torch.log_softmax(torch.as_tensor(logits), -1).numpy()
        positions = np.arange(len(context), len(ids))
        expected = logprobs[positions - 1, ids[positions]].mean()
        # tolerance: F32-ORDER (a mean of float32 log-probs)
        assert float(cloze.final_cloze_logprob[sample]) == pytest.approx(expected, abs=1e-4)


def test_head_on_scored_positions_equals_full_forward_logits(tiny_model_dir, data_dir):
    """The unembedding applied to the scored positions only gives the full forward's scores."""
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.capture import BatchRunner, wmdp_static
    from unlearn_lens.capture.inputs import build_inputs
    from unlearn_lens.loading import load_model

    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32")
    adapter = ArchitectureAdapter(model)
    letters, _ = wmdp_static(model, tokenizer, adapter)
    inputs = build_inputs(tokenizer, data_dir, ["wmdp", "wmdp_cloze"], 100, 64)
    head_only, full = BatchRunner(model, adapter, "float32", letters), BatchRunner(model, adapter, "float32", letters)
    full.head_only = False  # what a family with soft-capped or rescaled logits takes
    assert head_only.head_only
    for split, key in (("wmdp", "final_letter_logits"), ("wmdp_cloze", "final_cloze_logprob")):
        split_inputs = inputs[split]
        extra = {name: values[:5] for name, values in split_inputs.sample_arrays.items()}
        ours = head_only.run(split_inputs.token_ids[:5], split, extra)
        reference = full.run(split_inputs.token_ids[:5], split, extra)
        # tolerance: F32-ORDER (the head applied to the last states vs the full forward's logits)
        np.testing.assert_allclose(ours[key], reference[key], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(ours["resid"], reference["resid"])


def test_independent_of_batch_size_and_tokenizer_padding_side(tmp_path, data_dir, tiny_model_dir):
    import cache_store
    from unlearn_lens.capture import capture

    one, many = tmp_path / "one.zarr", tmp_path / "many.zarr"
    capture(str(tiny_model_dir), data_dir, str(one), settings(batch_size=1, splits=("forget",)))
    capture(str(tiny_model_dir), data_dir, str(many), settings(batch_size=4, splits=("forget",)))
    a, b = cache_store.open_cache(str(one), "forget"), cache_store.open_cache(str(many), "forget")
    np.testing.assert_array_equal(a.input_ids.values, b.input_ids.values)
    # tolerance: F32-ORDER (batch size 1 vs 4, left vs right padding)
    np.testing.assert_allclose(a.resid.values, b.resid.values, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(a.mlp_in.values, b.mlp_in.values, atol=2e-5, rtol=1e-4)


def test_left_padding_tokenizer_gives_same_cache(tmp_path, data_dir, tiny_model_dir):
    """Capture pads itself (right, masked), whatever the tokenizer's padding side says."""
    import shutil

    import cache_store
    from unlearn_lens.capture import capture

    left_dir = tmp_path / "left-model"
    shutil.copytree(tiny_model_dir, left_dir)
    config_path = left_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["padding_side"] = "left"
    config_path.write_text(json.dumps(config))
    right, left = tmp_path / "r.zarr", tmp_path / "l.zarr"
    capture(str(tiny_model_dir), data_dir, str(right), settings(splits=("retain",)))
    capture(str(left_dir), data_dir, str(left), settings(splits=("retain",)))
    np.testing.assert_array_equal(cache_store.open_cache(str(right), "retain").resid.values,
                                  cache_store.open_cache(str(left), "retain").resid.values)


def test_memory_url(data_dir, tiny_model_dir, family):
    import cache_store
    from unlearn_lens.capture import capture

    url = f"memory://capture-test-{os.getpid()}/{family}.zarr"
    capture(str(tiny_model_dir), data_dir, url, settings(splits=("retain",), dtype="float16"))
    assert cache_store.is_complete(url) and cache_store.list_splits(url) == ["retain"]
    ds = cache_store.open_cache(url, "retain")
    assert ds.resid.dtype == np.float16 and ds.sizes["sample"] == len(RETAIN)
    assert np.isfinite(ds.resid.values).all()


def test_float16_overflow_is_a_user_error(tmp_path, data_dir):
    import torch

    from unlearn_lens.capture import capture
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e6)
    model.save_pretrained(tmp_path / "big")
    tokenizer.save_pretrained(tmp_path / "big")
    with pytest.raises(UserError, match="--dtype float32"):
        capture(str(tmp_path / "big"), data_dir, str(tmp_path / "c.zarr"), settings(splits=("retain",), dtype="float16"))
    capture(str(tmp_path / "big"), data_dir, str(tmp_path / "c32.zarr"), settings(splits=("retain",), dtype="float32"))


def test_other_provenance_refused_without_overwrite(tmp_path, data_dir):
    import cache_store
    from unlearn_lens.capture import capture
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.testing import save_tiny_model

    first, second = save_tiny_model("gpt2", tmp_path / "a", seed=0), save_tiny_model("gpt2", tmp_path / "b", seed=1)
    out = str(tmp_path / "c.zarr")
    capture(str(first), data_dir, out, settings(splits=("retain",)))
    assert capture(str(first), data_dir, out, settings(splits=("retain",))) == {"retain": "already complete"}
    with pytest.raises(UserError, match="weights_fingerprint"):
        capture(str(second), data_dir, out, settings(splits=("retain",)))
    with pytest.raises(UserError, match="--overwrite"):
        capture(str(first), data_dir, out, settings(splits=("retain",), max_samples=2))
    capture(str(second), data_dir, out, settings(splits=("retain",), overwrite=True))
    fingerprint = cache_store.open_cache(out, "retain").attrs["weights_fingerprint"]
    from unlearn_lens.capture.provenance import weights_fingerprint
    from unlearn_lens.loading import load_model

    assert fingerprint == weights_fingerprint(load_model(str(second), with_tokenizer=False)[0])


def test_a_folder_that_holds_no_cache_survives_capture_and_overwrite(tmp_path, data_dir):
    """Nothing outside a cache is written into or deleted (issue 25): refused before any model loads."""
    from unlearn_lens.testing import save_tiny_model

    model = save_tiny_model("gpt2", tmp_path / "m")
    folder = tmp_path / "my-results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("four years of work")
    for extra in ([], ["--overwrite"]):
        code, _, stderr = run_cli(["capture", "--model", str(model), "--data", str(data_dir), "--out", str(folder),
                                   "--splits", "retain", "--quiet", *extra])
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert "holds no activation cache (it has: thesis.tex)" in stderr
        assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
        assert (folder / "thesis.tex").read_text() == "four years of work"


# --- processes: SIGKILL + resume, concurrent shards ------------------------------------------------

def run_cli(args: list[str], env_extra: dict | None = None, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-c", "import torch; torch.set_num_threads(1); import cli; cli.main()", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def capture_args(model_dir, data_dir, out) -> list[str]:
    return ["capture", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--splits", "forget,wmdp", "--batch-size", "3", "--block-samples", "4", "--quiet"]


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, llama_dir, data_dir) -> Path:
    out = tmp_path_factory.mktemp("ref") / "c.zarr"
    code, _, stderr = run_cli(capture_args(llama_dir, data_dir, out))
    assert code == 0, stderr
    return out


def test_sigkill_then_resume_is_byte_identical(tmp_path, llama_dir, data_dir, reference_cache):
    import cache_store
    from unlearn_lens.capture import KILL_ENV
    from unlearn_lens.core.errors import UserError

    out = tmp_path / "c.zarr"
    code, _, _ = run_cli(capture_args(llama_dir, data_dir, out), {KILL_ENV: "3"})  # mid-block 2 of forget
    assert code == -9
    assert not cache_store.is_complete(str(out))
    with pytest.raises(UserError, match="incomplete"):
        cache_store.open_cache(str(out), "forget")
    partial = cache_store.open_cache(str(out), "forget", allow_incomplete=True)
    assert partial.attrs["complete"] is False
    code, stdout, stderr = run_cli(capture_args(llama_dir, data_dir, out))
    assert code == 0, stderr
    assert tree_bytes(out) == tree_bytes(reference_cache)


def test_killed_between_splits_reads_incomplete_then_resumes(tmp_path, llama_dir, data_dir, monkeypatch):
    """A capture stopped after its first split completed, before the next one began, must not read
    complete (a resumed run would otherwise be skipped by every step that trusts is_complete)."""
    import cache_store
    from unlearn_lens.capture import capture, run

    real = run.capture_split
    started: list[str] = []

    def stop_at_second_split(runner, writer, inputs, *args, **kwargs):
        started.append(inputs.split)
        if len(started) == 2:
            raise KeyboardInterrupt  # the first split is complete, the second has written nothing
        return real(runner, writer, inputs, *args, **kwargs)

    out = tmp_path / "c.zarr"
    monkeypatch.setattr(run, "capture_split", stop_at_second_split)
    with pytest.raises(KeyboardInterrupt):
        capture(str(llama_dir), data_dir, str(out), settings(batch_size=2, block_samples=2))
    assert cache_store.is_complete(str(out), started[0]) and not cache_store.is_complete(str(out))
    assert set(cache_store.list_splits(str(out))) == {"forget", "retain", "wmdp", "wmdp_cloze"}
    monkeypatch.setattr(run, "capture_split", real)
    states = capture(str(llama_dir), data_dir, str(out), settings(batch_size=2, block_samples=2))
    assert states[started[0]] == "already complete" and cache_store.is_complete(str(out))


def test_two_concurrent_shards_equal_one_process(tmp_path, llama_dir, data_dir, reference_cache):
    out = tmp_path / "c.zarr"
    processes = [run_cli(capture_args(llama_dir, data_dir, out) + ["--shard", f"{k}/2"], wait=False) for k in (1, 2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [o[1] for o in outputs]
    assert tree_bytes(out) == tree_bytes(reference_cache)


def test_cache_info_and_verify_cli(tmp_path, reference_cache):
    import shutil

    copy = tmp_path / "c.zarr"
    shutil.copytree(reference_cache, copy)
    code, stdout, stderr = run_cli(["cache", "info", str(copy)])
    assert code == 0, stderr
    assert "weights_fingerprint" in stdout and "split forget: complete" in stdout and "ratio" in stdout
    code, stdout, _ = run_cli(["cache", "verify", str(copy), "--quiet"])
    assert code == 0 and "OK" in stdout
    chunk = next(p for p in sorted((copy / "forget" / "resid" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(b"garbage" * 10)
    code, stdout, stderr = run_cli(["cache", "verify", str(copy), "--quiet"])
    assert code == 2 and "FAIL" in stdout and "verification failed" in stderr


@pytest.mark.slow
def test_smollm2_capture_equals_hf(tmp_path, smollm2_dir):
    import cache_store
    from unlearn_lens.capture import capture
    from unlearn_lens.loading import load_tokenizer

    data = write_data(tmp_path / "data", forget=FORGET[:3], retain=RETAIN[:2], mcq=MCQ[:1])
    out = tmp_path / "c.zarr"
    capture(str(smollm2_dir), data, str(out), settings(splits=("forget", "wmdp"), max_length=48, token_chunk=None))
    tokenizer = load_tokenizer(str(smollm2_dir))
    ds = cache_store.open_cache(str(out), "forget")
    assert ds.resid.dtype == np.float32 and ds.sizes["layer"] == 31 and ds.sizes["hidden"] == 576
    for index, text in enumerate(FORGET[:3]):
        ids = np.asarray(tokenizer(text)["input_ids"])[:48]
        resid, mlp_in, _ = reference(smollm2_dir, ids)
        start = int(ds.sample_offset[index])
        # tolerance: F32-ORDER on the real 30-layer SmolLM2 (activations up to ~100): 1e-3
        np.testing.assert_allclose(ds.resid[:, start:start + len(ids)].values, resid, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(ds.mlp_in[:, start:start + len(ids)].values, mlp_in, atol=1e-3, rtol=1e-3)
    wmdp = cache_store.open_cache(str(out), "wmdp")
    assert wmdp.final_letter_logits.shape == (1, 4) and np.isfinite(wmdp.final_letter_logits.values).all()


def test_store_check_tells_overflow_from_nan():
    import torch

    from unlearn_lens.capture import BatchRunner
    from unlearn_lens.core.errors import UserError

    runner = BatchRunner.__new__(BatchRunner)
    runner.store_dtype = "float16"
    values = torch.zeros(2, 3, 4)
    assert runner._store(values.half(), "resid").dtype == np.float16
    values[1, 2, 3] = 1e5
    with pytest.raises(UserError, match="float16's range.*--dtype float32"):
        runner._store(values.half(), "resid")
    values[1, 2, 3] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        runner._store(values.half(), "resid")
