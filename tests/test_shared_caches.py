"""Caches shared between machines: on a real S3 API (moto's server + s3fs), over plain HTTP, and
checked chunk by chunk (crc32c), as collaborators would use them (issue 16, parts 2, 3 and 5).

Every server is a subprocess on a free localhost port; credentials and the S3 endpoint come from
the standard AWS environment only (no project flag), and must never show up in what we write.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_capture import run_cli, tree_bytes, write_data

#: Distinctive fake credentials: a test greps every output for them.
ACCESS_KEY, SECRET_KEY = "AKIAULENSFAKE0X7Q2", "ulens-fake-secret-9Zr4KpW2"
SPLITS = "forget,retain,wmdp"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def capture_args(model_dir, data_dir, out) -> list[str]:
    return ["capture", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out), "--splits", SPLITS,
            "--batch-size", "3", "--block-samples", "4", "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return save_tiny_model("llama", root / "base", seed=0), save_tiny_model("llama", root / "other", seed=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def local_caches(tmp_path_factory, models, data_dir) -> tuple[Path, Path]:
    """The base and another model captured locally by one process each: the references."""
    root = tmp_path_factory.mktemp("local")
    outs = root / "base.zarr", root / "other.zarr"
    for model, out in zip(models, outs):
        code, _, stderr = run_cli(capture_args(model, data_dir, out))
        assert code == 0, stderr
    return outs


# --- S3: a moto server as the collaborators' bucket ---------------------------------------------

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 API; yields the environment a user would set (standard AWS variables only)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.time() + 60
        while True:
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir("ulens")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield {"env": env, "outputs": []}
    finally:
        server.kill()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3_fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def s3_tree(url: str) -> dict[str, bytes]:
    """Every object under an s3:// cache, keyed like ``tree_bytes`` keys a local cache."""
    fs = s3_fs()
    root = url[len("s3://"):].rstrip("/")
    keys = sorted(fs.find(root))
    return {key[len(root) + 1:]: value for key, value in fs.cat(keys).items()} if keys else {}


def s3_cli(s3, args: list[str], env_extra: dict | None = None, wait: bool = True):
    """The CLI in a subprocess with the AWS environment; keeps its output for the credentials grep."""
    result = run_cli(args, {**s3["env"], **(env_extra or {})}, wait=wait)
    if wait:
        s3["outputs"].append(result[1] + result[2])
    return result


@pytest.mark.slow
def test_s3_capture_equals_local_and_reads_back(s3, models, data_dir, local_caches):
    import cache_store

    url = "s3://ulens/caches/base.zarr"
    code, stdout, stderr = s3_cli(s3, capture_args(models[0], data_dir, url))
    assert code == 0, stderr
    assert s3_tree(url) == tree_bytes(local_caches[0])  # every chunk and metadata document, byte for byte
    assert cache_store.is_complete(url) and cache_store.list_splits(url) == ["forget", "retain", "wmdp", "wmdp_cloze"]
    remote, local = cache_store.open_cache(url, "forget"), cache_store.open_cache(str(local_caches[0]), "forget")
    for name in ("resid", "mlp_in", "last", "input_ids", "sample_offset"):
        np.testing.assert_array_equal(remote[name].values, local[name].values)
    code, stdout, stderr = s3_cli(s3, ["cache", "verify", url, "--quiet"])
    assert code == 0 and "OK" in stdout and "checksum" in stdout, stderr


@pytest.mark.slow
def test_s3_two_concurrent_shards_equal_one_process(s3, models, data_dir, local_caches):
    url = "s3://ulens/caches/sharded.zarr"
    processes = [s3_cli(s3, capture_args(models[0], data_dir, url) + ["--shard", f"{k}/2"], wait=False)
                 for k in (1, 2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    s3["outputs"] += [out + err for out, err in outputs]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    assert s3_tree(url) == tree_bytes(local_caches[0])


@pytest.mark.slow
def test_s3_sigkill_then_resume_is_byte_identical(s3, models, data_dir, local_caches):
    import cache_store
    from unlearn_lens.capture import KILL_ENV

    url = "s3://ulens/caches/killed.zarr"
    code, _, _ = s3_cli(s3, capture_args(models[0], data_dir, url), {KILL_ENV: "3"})
    assert code == -9 and not cache_store.is_complete(url)
    code, _, stderr = s3_cli(s3, capture_args(models[0], data_dir, url))
    assert code == 0, stderr
    assert s3_tree(url) == tree_bytes(local_caches[0])


@pytest.mark.slow
def test_s3_analyze_equals_local_and_no_credentials_anywhere(s3, local_caches, tmp_path):
    fs = s3_fs()
    for path in local_caches:  # a collaborator uploads finished caches
        fs.put(str(path), f"ulens/shared/{path.name}", recursive=True)
    outs = tmp_path / "s3-out", tmp_path / "local-out"
    for out, (base, other) in zip(outs, (("s3://ulens/shared/base.zarr", "s3://ulens/shared/other.zarr"),
                                         local_caches)):
        code, stdout, stderr = s3_cli(s3, ["analyze", "--base", str(base), "--compare", f"other={other}",
                                           "--outdir", str(out), "--no-progress"])
        assert code == 0, stderr
    csvs = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.csv"))
    assert csvs
    for rel in csvs:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel

    # the credentials never reach cache attributes/metadata, logs or any output file
    texts = list(s3["outputs"])
    for prefix in ("ulens/caches", "ulens/shared"):
        texts += [value.decode("latin-1") for value in s3_tree(f"s3://{prefix}").values()]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert len(texts) > 20
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert not [text[:80] for text in texts if secret in text]


# --- HTTP: any static file server shares a finished cache read-only -----------------------------

@pytest.fixture
def serve():
    """Starts ``python -m http.server`` over a folder; gives (base URL, function listing its requests)."""
    servers = []

    def start(folder: Path):
        port = free_port()
        log_path = folder.parent / f"http-{port}.log"
        with open(log_path, "w") as log:
            servers.append(subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                             "--directory", str(folder)], stdout=log, stderr=log))
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

        def requests() -> list[str]:
            time.sleep(0.2)  # the server writes each log line after answering
            return [line for line in log_path.read_text().splitlines() if '"GET ' in line or '"HEAD ' in line]

        return f"http://127.0.0.1:{port}", requests

    yield start
    for server in servers:
        server.kill()
        server.wait()


def test_http_open_cache_takes_one_metadata_request(serve, tmp_path):
    import cache_store
    from test_cache_store import LENGTHS, write_synthetic

    folder = tmp_path / "shared"
    _, resid, _ = write_synthetic(str(folder / "base.zarr"), LENGTHS)
    base, requests = serve(folder)
    before = len(requests())
    ds = cache_store.open_cache(f"{base}/base.zarr", "forget")
    opened = requests()[before:]
    metadata = [line for line in opened if "zarr.json" in line]
    assert len(metadata) == 1 and "/base.zarr/zarr.json" in metadata[0], opened
    assert all("zarr.json" in line or "/forget/sample_length/c/" in line for line in opened), opened  # no crawl
    np.testing.assert_array_equal(ds.resid.values, np.concatenate(resid, axis=1))
    assert cache_store.list_splits(f"{base}/base.zarr") == ["forget"]
    from cache_store.inspect import verify

    assert verify(f"{base}/base.zarr") == []  # reads every chunk over HTTP, checksums included


@pytest.mark.slow
def test_http_analyze_equals_local_and_writing_is_refused(serve, local_caches, tmp_path):
    base, _ = serve(local_caches[0].parent)
    outs = tmp_path / "http-out", tmp_path / "local-out"
    for out, (a, b) in zip(outs, ((f"{base}/base.zarr", f"{base}/other.zarr"), local_caches)):
        code, _, stderr = run_cli(["analyze", "--base", str(a), "--compare", f"other={b}", "--outdir", str(out),
                                   "--no-progress"])
        assert code == 0, stderr
    csvs = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.csv"))
    assert csvs and all((outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes() for rel in csvs)
    code, stdout, stderr = run_cli(["capture", "--model", "unused", "--data", str(tmp_path), "--out",
                                    f"{base}/new.zarr"])
    assert code == 2 and stderr.strip().splitlines() == [
        f"error: {base}/new.zarr: http(s) caches are read-only; capture to a path or an object store "
        "(s3://...) and serve the finished cache"]
    code, _, stderr = run_cli(["cache", "verify", f"{base}/base.zarr", "--quiet", "--reset-damaged"])
    assert code == 2 and "read-only" in stderr and len(stderr.strip().splitlines()) == 1


# --- integrity: a flipped byte is named, refused, and recaptured ---------------------------------

def reset_and_recapture(base, model, data_dir, clean) -> None:
    """The documented repair: `cache verify --reset-damaged` resets forget's damaged blocks, the same
    capture rewrites them (retain untouched), and the cache verifies and equals the clean one, byte for byte."""
    code, stdout, _ = run_cli(["cache", "verify", str(base), "--quiet", "--reset-damaged"])
    assert code == 2 and "reset forget: blocks " in stdout
    code, stdout, stderr = run_cli(capture_args(model, data_dir, base))
    assert code == 0 and "forget: complete" in stdout and "retain: already complete" in stdout, stderr
    code, stdout, _ = run_cli(["cache", "verify", str(base), "--quiet"])
    assert code == 0 and "OK" in stdout
    assert tree_bytes(base) == tree_bytes(clean)


@pytest.mark.slow
def test_flipped_byte_named_by_verify_refused_by_analyze_and_recaptured(tmp_path, models, data_dir, local_caches):
    base = tmp_path / "base.zarr"
    shutil.copytree(local_caches[0], base)
    chunks = sorted(p for p in (base / "forget" / "resid" / "c").rglob("*") if p.is_file())
    chunk = chunks[len(chunks) // 2]
    key = "forget/" + chunk.relative_to(base / "forget").as_posix()
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))

    code, stdout, stderr = run_cli(["cache", "verify", str(base), "--quiet"])
    assert code == 2 and stdout.splitlines() == [f"FAIL {key}: damaged chunk (checksum mismatch)"], stdout
    code, stdout, stderr = run_cli(["analyze", "--base", str(base), "--compare", f"other={local_caches[1]}",
                                    "--outdir", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and stderr.strip().splitlines() == [
        f"error: {base}: chunk {key} is damaged (checksum mismatch); run `unlearn-lens cache verify {base} "
        "--reset-damaged`, then rerun its capture command"], stderr
    assert not list((tmp_path / "out").rglob("*.csv"))  # nothing computed on it

    reset_and_recapture(base, models[0], data_dir, local_caches[0])


# --- a missing chunk: named, refused, reset and recaptured (issue 25) ------------------------------

@pytest.mark.slow
def test_missing_chunk_named_by_verify_refused_by_analyze_and_recaptured(tmp_path, models, data_dir, local_caches):
    base = tmp_path / "base.zarr"
    shutil.copytree(local_caches[0], base)
    chunks = sorted(p for p in (base / "forget" / "resid" / "c").rglob("*") if p.is_file())
    chunk = chunks[len(chunks) // 2]
    key = "forget/" + chunk.relative_to(base / "forget").as_posix()
    chunk.unlink()  # a partial copy, a sync tool, an object-store lifecycle rule

    code, stdout, _ = run_cli(["cache", "verify", str(base), "--quiet"])
    assert code == 2 and stdout.splitlines() == [f"FAIL {key}: missing chunk"], stdout
    code, _, stderr = run_cli(["analyze", "--base", str(base), "--compare", f"other={local_caches[1]}",
                               "--outdir", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"error: {base}: chunk {key} is missing") and "--reset-damaged" in stderr
    assert not list((tmp_path / "out").rglob("*.csv"))  # nothing computed on zeros

    reset_and_recapture(base, models[0], data_dir, local_caches[0])
