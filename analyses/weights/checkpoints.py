"""Torch-free, lazy checkpoint reading: one tensor at a time from safetensors, a hub id or a GGUF file.

Parameter diagnostics (and anything needing the unembedding) read weights without loading a
model, so two 7B checkpoints can be compared on a laptop: nothing here holds more than the one
tensor being read. Names are always Hugging Face names; ``read_matrix`` returns linear weights as
(out_features, in_features) whatever the storage convention (GPT-2 Conv1D, GGUF).

    ckpt = open_checkpoint("path/to/model")          # or "org/name", or "model.Q4_1.gguf"
    W = ckpt.read_matrix("model.layers.3.mlp.down_proj.weight")
    U = ckpt.unembedding()                           # (vocab, hidden) float32
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_lens.core.errors import UserError
from unlearn_lens.core.models import resolve_source
from unlearn_lens.core.naming import classify, family_from_config, orient

#: safetensors dtype codes numpy reads directly (BF16 is decoded by hand; numpy lacks it).
_SAFETENSORS_NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode bfloat16 values given as their raw uint16 bit patterns (exact: bf16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Parse a safetensors header: ``({name: {dtype, shape, data_offsets}}, data_start_byte)``."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise UserError(f"{path} is truncated ({len(raw)} bytes: not even a safetensors header); "
                            f"{COPY_AGAIN}")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise UserError(f"{path}: not a safetensors file (header length {length})")
        text = handle.read(length)
        if len(text) < length:
            raise UserError(f"{path} is truncated (it ends inside its safetensors header); {COPY_AGAIN}")
        try:
            header = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{path}: not a safetensors file (bad header)") from exc
    header.pop("__metadata__", None)
    return header, 8 + length


#: what to do about a truncated or damaged weights file
COPY_AGAIN = "copy or download it again (a partial download or copy)"


def check_safetensors_size(path: str | Path, header: dict[str, dict[str, Any]], start: int) -> None:
    """Refuse a safetensors file shorter than its header says: it was cut off (a partial copy or download)."""
    needed = start + max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    size = os.path.getsize(path)
    if size < needed:
        raise UserError(f"{path} is truncated ({size} bytes; its header describes {needed}); {COPY_AGAIN}")


def check_weight_files(spec: str) -> None:
    """Refuse a local checkpoint whose safetensors files are cut off, before anything loads them.

    Reads only the headers and file sizes, so a 6.9B model's truncated shard is named in a second
    instead of failing in the middle of a load. Hub ids are left to the download; directories
    without safetensors (``.bin``) are not checked; a GGUF file is checked when its load fails
    (``open_gguf``: parsing it costs seconds).
    """
    source = resolve_source(spec)
    if source.kind == "hf_dir":
        try:
            files = _safetensors_files(source.path)
        except UserError:
            return
        for file in files:
            check_safetensors_size(file, *read_safetensors_header(file))


def open_gguf(file: str | Path) -> Any:
    """A ``gguf.GGUFReader`` of ``file``; a one-line ``UserError`` naming a truncated or damaged file."""
    import gguf

    try:
        return gguf.GGUFReader(str(file))
    except Exception as exc:  # a truncated copy (its tensor table points past the end), a foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        size = os.path.getsize(file)
        raise UserError(f"{file} is truncated or not a GGUF file ({size} bytes; reading it failed: "
                        f"{type(exc).__name__}: {first}); {COPY_AGAIN}") from None


class Checkpoint:
    """A lazily read checkpoint: tensor names, shapes and one tensor at a time.

    Attributes: ``family`` (``gpt_neox`` / ``llama`` / ``gpt2``), ``config`` (the ``config.json``
    contents, or the equivalent built from GGUF metadata), ``path`` (local directory or file).
    """

    family: str
    config: dict
    path: str

    def names(self) -> list[str]:
        """Every tensor name, in Hugging Face naming, sorted."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of one tensor (GGUF tensors: their Hugging Face shape)."""
        raise NotImplementedError

    def _read_raw(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _stored(self) -> Any:
        """``(name, shape, stored dtype, byte chunks)`` of every stored tensor, sorted by name."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 prefix over every stored tensor's name, shape, stored dtype and bytes, as stored.

        It changes with any weight and needs no torch, so a cache can record it at capture
        (``checkpoint_fingerprint``) and a reader can check, on a CPU node, that the checkpoint it
        combines with the cache holds the weights the cache was captured from.
        """
        digest = hashlib.sha256()
        for name, shape, dtype, chunks in self._stored():
            digest.update(f"{name}|{tuple(shape)}|{dtype}|".encode())
            for chunk in chunks:
                digest.update(chunk)
        return digest.hexdigest()[:32]

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def _check(self, name: str) -> None:
        if name not in self:
            raise UserError(f"{self.path}: no tensor named {name!r}")

    def read(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """One tensor as stored (layout untouched), cast to ``dtype`` (None keeps the stored dtype)."""
        self._check(name)
        array = self._read_raw(name)
        if dtype is not None and array.dtype != np.dtype(dtype):
            array = array.astype(dtype)
        return array

    def read_matrix(self, name: str) -> np.ndarray:
        """A 2-D weight as C-contiguous float32, oriented (out_features, in_features)."""
        array = self.read(name, np.float32)
        if array.ndim != 2:
            raise UserError(f"{name}: expected a 2-D weight, got shape {tuple(array.shape)}")
        return np.ascontiguousarray(orient(name, array, self.family))

    def _role_name(self, role: str) -> str | None:
        for name in self.names():
            if name.endswith(".weight") and classify(name, self.family).role == role:
                return name
        return None

    def unembedding(self) -> np.ndarray:
        """The unembedding matrix (vocab, hidden) as float32.

        The input embedding stands in when the weights are tied (``tie_word_embeddings``) or the
        checkpoint holds no ``lm_head`` / ``embed_out`` tensor.
        """
        unembed = None if self.config.get("tie_word_embeddings") is True else self._role_name("unembed")
        name = unembed or self._role_name("embed")
        if name is None:
            raise UserError(f"{self.path}: holds neither an unembedding nor an input embedding")
        matrix = self.read(name, np.float32)
        if matrix.ndim != 2:
            raise UserError(f"{name}: expected a 2-D embedding, got shape {tuple(matrix.shape)}")
        hidden = self.config.get("hidden_size") or self.config.get("n_embd")
        if hidden and matrix.shape[0] == hidden and matrix.shape[1] != hidden:
            matrix = matrix.T  # stored (hidden, vocab)
        return np.ascontiguousarray(matrix)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, family={self.family!r})"


class SafetensorsCheckpoint(Checkpoint):
    """A local Hugging Face directory: ``model.safetensors`` or an index plus shards."""

    def __init__(self, directory: str | Path, config: dict):
        self.path = str(directory)
        self.config = config
        self.family = family_from_config(config)
        self._files = _safetensors_files(Path(directory))
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for file in self._files:
            header, start = read_safetensors_header(file)
            check_safetensors_size(file, header, start)
            for name, entry in header.items():
                self._where[name] = (file, entry, start)
        self._names = sorted(self._where)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return tuple(int(n) for n in self._where[name][1]["shape"])

    def _stored(self) -> Any:
        for name in self._names:
            file, entry, start = self._where[name]
            begin, end = (int(offset) for offset in entry["data_offsets"])
            yield name, entry["shape"], entry["dtype"], _file_chunks(file, start + begin, end - begin)

    def stored_dtype(self, name: str) -> str:
        """safetensors dtype code of one tensor (``F32``, ``F16``, ``BF16`` ...)."""
        self._check(name)
        return str(self._where[name][1]["dtype"])

    def _read_raw(self, name: str) -> np.ndarray:
        file, entry, start = self._where[name]
        code, shape = entry["dtype"], tuple(entry["shape"])
        if code == "BF16":
            begin, end = entry["data_offsets"]
            count = (end - begin) // 2
            bits = np.fromfile(file, dtype="<u2", count=count, offset=start + begin)
            return bf16_bits_to_float32(bits).reshape(shape)
        if code not in _SAFETENSORS_NUMPY:
            raise UserError(f"{name}: unsupported safetensors dtype {code}")
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as handle:
            return handle.get_tensor(name)


#: bytes read at a time when hashing stored tensors (bounded memory for 6.9B checkpoints)
_HASH_CHUNK = 64 << 20


def _file_chunks(path: Path, offset: int, length: int) -> Any:
    """The ``length`` bytes of ``path`` from ``offset``, in chunks of at most ``_HASH_CHUNK``."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        while length > 0:
            chunk = handle.read(min(length, _HASH_CHUNK))
            if not chunk:
                raise UserError(f"{path} is truncated (it ends inside a tensor); {COPY_AGAIN}")
            length -= len(chunk)
            yield chunk


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise UserError(f"{index}: not a safetensors index (no weight_map)") from exc
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{directory}: shard {missing[0]} named in the index is missing")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("adapter"))
    if others:
        return others
    hint = " (pickle .bin weights are not read; convert to safetensors)" if any(directory.glob("*.bin")) else ""
    raise UserError(f"{directory}: no safetensors weights found{hint}")


# --- GGUF (llama.cpp) -------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def gguf_to_hf_name(name: str) -> str | None:
    """Hugging Face llama name of a GGUF tensor name (None for tensors HF does not store)."""
    match = re.match(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$", name)
    if match:
        layer, part, kind = match.groups()
        target = _GGUF_BLOCK.get(part)
        return f"model.layers.{layer}.{target}.{kind}" if target else None
    match = re.match(r"^([a-z_]+)\.(weight|bias)$", name)
    if match and match.group(1) in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[match.group(1)]}.{match.group(2)}"
    return None


def unpermute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary halves interleaved per head) on rows."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weights.shape))


class GGUFCheckpoint(Checkpoint):
    """A llama-family GGUF file, dequantized to float32 tensor by tensor, in HF names and layout."""

    def __init__(self, file: str | Path):
        self.path = str(file)
        self._reader = open_gguf(self.path)
        meta = {key: self._field(key) for key in self._reader.fields if not key.startswith("tokenizer.")}
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise UserError(f"{file}: GGUF architecture {arch!r} is not supported (only llama)")
        self._tensors = {}
        for tensor in self._reader.tensors:
            hf = gguf_to_hf_name(tensor.name)
            if hf is not None:
                self._tensors[hf] = tensor
        heads = int(meta.get("llama.attention.head_count", 0))
        self.config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": int(meta.get("llama.embedding_length", 0)),
            "intermediate_size": int(meta.get("llama.feed_forward_length", 0)),
            "num_hidden_layers": int(meta.get("llama.block_count", 0)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
            "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
            "vocab_size": int(self.shape("model.embed_tokens.weight")[0]) if "model.embed_tokens.weight" in self._tensors else None,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        self.family = family_from_config(self.config)

    def _stored(self) -> Any:
        for tensor in sorted(self._reader.tensors, key=lambda t: t.name):  # every tensor, in GGUF names
            yield tensor.name, tensor.shape.tolist(), tensor.tensor_type.name, [np.ascontiguousarray(tensor.data)]

    def _field(self, key: str) -> Any:
        field = self._reader.fields[key]
        try:
            value = field.contents()
        except Exception:
            return None
        return value

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return tuple(int(n) for n in reversed(self._tensors[name].shape.tolist()))

    def _read_raw(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(self.shape(name))
        if ".self_attn.q_proj." in name:
            array = unpermute_rows(array, self.config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            array = unpermute_rows(array, self.config["num_key_value_heads"])
        return array


# --- opening a spec ---------------------------------------------------------------------------


def _read_config(directory: Path) -> dict:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{directory}: not a model directory (no config.json)")
    try:
        return json.loads(config_file.read_text())
    except ValueError as exc:
        raise UserError(f"{config_file}: not valid JSON") from exc


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors"],
            token=os.environ.get("HF_TOKEN") or None,
        )
    except Exception as exc:  # offline, gated, misspelt: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise UserError(f"could not fetch {where!r} from the Hugging Face hub (offline, gated or misspelt?): {first}") from exc
    return Path(local)


def open_checkpoint(spec: str, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint lazily from a local HF directory, a ``.gguf`` file or a hub id.

    Hub ids download only ``*.json`` and ``*.safetensors`` (at ``revision``). Missing paths,
    directories without safetensors and unknown architectures raise a one-line ``UserError``.
    """
    source = resolve_source(spec)
    if source.kind == "gguf":
        return GGUFCheckpoint(source.path)
    directory = source.path if source.kind == "hf_dir" else _download(source.spec, revision)
    return SafetensorsCheckpoint(directory, _read_config(directory))


def checkpoint_fingerprint(spec: str, revision: str | None = None) -> str | None:
    """``Checkpoint.fingerprint`` of a model spec, or None where its weights cannot be read without
    torch (pickle ``.bin`` weights, a GGUF architecture this reader does not know)."""
    try:
        return open_checkpoint(spec, revision).fingerprint()
    except UserError:
        return None
