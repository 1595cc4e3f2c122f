"""One chunk at a time, the way zarr writes it, from any number of threads (the writer's hot path).

``ChunkCodec`` encodes a chunk with the array's own codec chain (``bytes`` -> ``zstd`` ->
``crc32c``, or without zstd / crc32c where the array was created so) and gives the bytes zarr
itself writes (``tests/test_cache_store.py`` compares them); ``ChunkSink`` stores them under the
chunk's key, as a file of a local cache or an object of an fsspec URL. zstd and crc32c release
the GIL, so several threads encode and write chunks in parallel without zarr's event loop in
between: the writer then scales with cores (``benchmarks/bench_capture_scale.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache_store import store as stores

#: Codec classes this module encodes itself; an array with any other codec is written through zarr.
SUPPORTED_CODECS = ("BytesCodec", "ZstdCodec", "Crc32cCodec")


class ChunkCodec:
    """Encodes whole chunks of one zarr v3 array exactly as zarr's codec pipeline would."""

    def __init__(self, array: Any) -> None:
        metadata = array.metadata
        self.chunk_shape = tuple(int(n) for n in array.chunks)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill_value = metadata.fill_value
        self.encode_key = metadata.encode_chunk_key
        self.zstd = None
        self.crc32c = False
        names = [type(codec).__name__ for codec in metadata.codecs]
        self.supported = all(name in SUPPORTED_CODECS for name in names) and names[:1] == ["BytesCodec"]
        for codec in metadata.codecs:
            name = type(codec).__name__
            endian = getattr(codec, "endian", None)
            if name == "BytesCodec" and endian is not None and getattr(endian, "value", endian) != "little":
                self.supported = False
            if name == "ZstdCodec":
                from numcodecs import Zstd

                self.zstd = Zstd(level=codec.level, checksum=codec.checksum)  # what zarr's codec calls
            if name == "Crc32cCodec":
                self.crc32c = True

    def key(self, coords: tuple[int, ...]) -> str:
        """The chunk's key relative to its array (``c/1/2/0``)."""
        return self.encode_key(tuple(int(c) for c in coords))

    def encode(self, values: np.ndarray) -> bytes:
        """The stored bytes of one chunk; an edge chunk smaller than the grid is padded with the fill value."""
        values = np.asarray(values)
        if values.shape != self.chunk_shape:
            padded = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
            padded[tuple(slice(0, n) for n in values.shape)] = values
            values = padded
        data: Any = np.ascontiguousarray(values, dtype=self.dtype)
        if self.zstd is not None:
            data = self.zstd.encode(data)
        data = bytes(data) if not isinstance(data, bytes) else data
        if self.crc32c:
            import google_crc32c

            data += google_crc32c.value(data).to_bytes(4, "little")
        return data


class ChunkSink:
    """Writes encoded chunks under their store keys: files of a local cache, objects of a URL."""

    def __init__(self, url: str) -> None:
        self.path = stores.local_path(url)
        if self.path is None:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(str(url))
            self.root = root.rstrip("/")

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (``forget/resid/c/1/2/0``), replacing what is there."""
        if self.path is not None:
            target: Path = self.path / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        else:
            self.fs.pipe_file(f"{self.root}/{key}", data)
