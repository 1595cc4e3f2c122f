"""Broken environments end in one ``error:`` line naming the cause and the fix, exit status 2, no
traceback (issue #25): object-store credentials (a real S3 API: moto's server), a refused connection,
a full disk (a small tmpfs where this machine lets us mount one, else a store that raises ENOSPC),
truncated safetensors and GGUF files, an unreadable ``zarr.json``. Each failed as
``internal error: <ExceptionName>`` (exit 1) before, some only after the model had loaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_capture import write_data
from test_shared_caches import ACCESS_KEY, SECRET_KEY, free_port, s3  # noqa: F401  (the moto server fixture)

ROOT = Path(__file__).resolve().parents[1]
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def cli(args: list[str], env: dict | None = None, drop: tuple[str, ...] = (), prelude: str = "") -> tuple[int, str]:
    """``python -m cli ARGS`` in a subprocess (``prelude``: Python run first); returns (status, stderr)."""
    environment = {key: value for key, value in os.environ.items() if key not in drop}
    environment.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    code = f"{prelude}\nimport cli\ncli.main()"
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env=environment, cwd=ROOT, timeout=300)
    return run.returncode, run.stderr


def one_error_line(status: int, stderr: str, *needles: str) -> str:
    """The run ended in exactly one ``error:`` line (exit 2, no traceback) containing every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("env-model") / "model")


@pytest.fixture(scope="module")
def truncated_model(model_dir, tmp_path_factory) -> Path:
    """The tiny model with its safetensors file cut in half (a partial copy)."""
    copy = tmp_path_factory.mktemp("env-truncated") / "model"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return copy


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("env-data"))


@pytest.fixture(scope="module")
def cache(model_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("env-cache") / "base.zarr"
    status, stderr = cli(["capture", "--model", model_dir, "--data", data_dir, "--out", out, "--splits",
                          "forget,retain", "--max-samples", "6", "--quiet"])
    assert status == 0, stderr[-2000:]
    return out


def capture_args(model, data, out) -> list:
    return ["capture", "--model", model, "--data", data, "--out", out, "--splits", "forget,retain",
            "--max-samples", "6", "--quiet"]


# --- object stores ------------------------------------------------------------------------------

def test_s3_without_credentials_is_named_before_the_model_loads(s3, truncated_model, data_dir):  # noqa: F811
    """The model given is truncated: had capture loaded it first, the error would name the weights."""
    status, stderr = cli(capture_args(truncated_model, data_dir, "s3://ulens/nocreds.zarr"),
                         env={"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull},
                         drop=AWS_VARIABLES)
    one_error_line(status, stderr, "s3://ulens/nocreds.zarr", "no object-store credentials",
                   "AWS_ACCESS_KEY_ID")


def test_s3_missing_bucket_and_refused_endpoint_are_one_line(s3, truncated_model, data_dir):  # noqa: F811
    status, stderr = cli(capture_args(truncated_model, data_dir, "s3://no-such-bucket/a.zarr"))
    one_error_line(status, stderr, "the bucket does not exist")
    refused = f"http://127.0.0.1:{free_port()}"
    status, stderr = cli(capture_args(truncated_model, data_dir, "s3://ulens/a.zarr"),
                         env={"AWS_ENDPOINT_URL": refused, "AWS_MAX_ATTEMPTS": "1"})
    one_error_line(status, stderr, "cannot connect", "AWS_ENDPOINT_URL")
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in stderr


def test_a_refused_http_connection_is_named_not_read_as_a_missing_cache(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/caches/base.zarr"  # nothing listens there
    status, stderr = cli(["analyze", "--base", url, "--compare", f"x={url}", "--outdir", tmp_path / "out"])
    error = one_error_line(status, stderr, url, "cannot connect", "check that the server is up")
    assert "no activation cache" not in error
    status, stderr = cli(["cache", "info", url])
    one_error_line(status, stderr, "cannot connect")


# --- a full disk --------------------------------------------------------------------------------

def _small_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` where this machine allows it (root, mount permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


#: Python run before the CLI where no tmpfs can be mounted: every chunk write fails as on a full disk
NO_SPACE_STORE = """
import errno, os, zarr.storage
async def _full(self, key, value, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
zarr.storage.LocalStore.set = _full
"""


#: Python run before the CLI: the free space is unknown to capture's plan (as on an object store), so
#: the capture starts and the disk fills while it writes (another process took the space after the plan)
UNKNOWN_FREE_SPACE = """
import unlearn_lens.capture.plan as plan
plan.free_bytes = lambda out: None
"""


def test_a_full_disk_is_one_line_naming_the_output_and_the_fix(tmp_path, model_dir, data_dir, cache):
    disk = tmp_path / "small-disk"
    mounted = _small_tmpfs(disk, "64k")
    try:
        out = disk / "base.zarr"
        if mounted:  # a cache that cannot fit is refused by the plan, before the model loads ...
            status, stderr = cli(capture_args(model_dir, data_dir, out))
            one_error_line(status, stderr, "the cache would take", "are free")
        prelude = UNKNOWN_FREE_SPACE + ("" if mounted else NO_SPACE_STORE)
        status, stderr = cli(capture_args(model_dir, data_dir, out), prelude=prelude)  # ... or fails while writing
        one_error_line(status, stderr, f"no space left on the device writing {out}", "free some space",
                       "resumes")
        if mounted:  # analyze's outputs fill the same disk
            status, stderr = cli(["analyze", "--base", cache, "--compare", f"x={cache}", "--outdir", disk / "out",
                                  "--no-progress"])
            one_error_line(status, stderr, "no space left on the device", str(disk / "out"))
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


# --- truncated weights files --------------------------------------------------------------------

def test_a_truncated_safetensors_file_is_named_by_capture_params_and_analyze(tmp_path, model_dir, truncated_model,
                                                                          data_dir, cache):
    weights = str(truncated_model / "model.safetensors")
    status, stderr = cli(capture_args(truncated_model, data_dir, tmp_path / "t.zarr"))
    one_error_line(status, stderr, weights, "is truncated", "copy or download it again")
    assert not (tmp_path / "t.zarr").exists()
    status, stderr = cli(["params", "--model-a", model_dir, "--model-b", truncated_model, "--outdir", tmp_path / "p"])
    one_error_line(status, stderr, weights, "is truncated")
    status, stderr = cli(["analyze", "--base", cache, "--compare", f"x={cache}", "--checkpoint",
                          f"x={truncated_model}", "--outdir", tmp_path / "a", "--allow-mismatch"])
    one_error_line(status, stderr, weights, "is truncated")


def test_a_truncated_gguf_file_is_named(tmp_path, smollm2_gguf, data_dir):
    truncated = tmp_path / "model.gguf"
    with open(smollm2_gguf, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read(20_000_000))  # the tensor table survives, the data is cut off
    status, stderr = cli(["params", "--model-a", smollm2_gguf, "--model-b", truncated, "--outdir", tmp_path / "p"])
    one_error_line(status, stderr, str(truncated), "is truncated", "copy or download it again")
    status, stderr = cli(capture_args(truncated, data_dir, tmp_path / "g.zarr"))
    one_error_line(status, stderr, str(truncated), "is truncated")


# --- damaged cache metadata ---------------------------------------------------------------------

def test_an_unreadable_zarr_json_is_named_by_every_reader(tmp_path, cache):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(cache, damaged)
    document = damaged / "zarr.json"
    document.write_bytes(document.read_bytes()[:100])  # a copy cut off in the middle of the metadata
    for args in (["cache", "info", damaged], ["cache", "verify", damaged],
                 ["analyze", "--base", damaged, "--compare", f"x={cache}", "--outdir", tmp_path / "out"]):
        status, stderr = cli(args)
        one_error_line(status, stderr, f"{damaged}/zarr.json is unreadable", "recapture")
