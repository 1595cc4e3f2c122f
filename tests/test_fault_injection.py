"""Fault injection: `capture` and `analyze` killed with SIGKILL at random points, then resumed by the
same command, end exactly where a clean run ends (issue #25).

Each seed is a chain: the command is started and killed (SIGKILL, from outside) at a random point of
its progress (once it has written a random number of the files a clean run writes, drawn anew for
every kill), started again, killed again..., and finally run to the end. The resumed cache must be
byte-identical to the clean run's; the resumed analyze must write the clean run's CSVs byte for byte.
At every kill, whatever is marked complete must already be right: a cache whose splits are all
complete holds the clean cache's data, and every analyze folder marked complete holds the CSVs of
the run its marker names, all of one run (never the earlier run's beside this one's). A kill point
is the state the kill left on disk (which files, which markers); the suite counts the distinct ones.
Everything goes through `python -m cli` subprocesses, as a user's runs do.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_analyze_e2e import plant_mlp_change
from test_capture import write_data

ROOT = Path(__file__).resolve().parents[1]
CAPTURE_SEEDS = range(3)
ANALYZE_SEEDS = range(2)
KILLS_PER_CHAIN = 3


def start(args: list) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


def written_since(root: Path, since: float) -> int:
    """How many files under ``root`` were written at or after ``since`` (a ``time.time()``)."""
    count = 0
    for path in root.rglob("*") if root.exists() else ():
        try:
            count += path.is_file() and path.stat().st_mtime >= since
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return count


def clean_run(args: list, output: Path) -> int:
    """Run to the end; returns how many files it wrote under ``output`` (the span kill points are drawn from)."""
    began = time.time() - 0.05  # file times and the clock may disagree by a tick
    finish(start(args))
    return written_since(output, began)


def killed_at(args: list, output: Path, files_written: int) -> bool:
    """Start ``args`` and SIGKILL it once it has written ``files_written`` files under ``output``;
    False when it finished first."""
    began = time.time() - 0.05
    process = start(args)
    while process.poll() is None:
        if written_since(output, began) >= files_written:
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
            return True
        time.sleep(0.005)
    finish(process)
    return False


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("fault-injection")
    base = save_tiny_model("llama", root / "base")
    return {"root": root, "data": write_data(root / "data"), "base": base,
            "unl": plant_mlp_change(base, root / "unl", "llama", 1), "other": save_tiny_model("llama", root / "other",
                                                                                              seed=1)}


def capture_args(model: Path, data: Path, out: Path) -> list:
    """Many small blocks and batches, so that a kill can land between many different writes."""
    return ["capture", "--model", model, "--data", data, "--out", out, "--batch-size", "1", "--block-samples", "2",
            "--dtype", "float32", "--quiet"]


@pytest.fixture(scope="module")
def caches(setup) -> dict:
    """Every model captured once, cleanly (the references); the base's capture counts the files it writes."""
    out = {name: setup["root"] / f"{name}.zarr" for name in ("base", "unl", "other")}
    from unlearn_lens.capture import CaptureSettings, capture

    span = clean_run(capture_args(setup["base"], setup["data"], out["base"]), out["base"])
    for name in ("unl", "other"):  # the analyze chains' other inputs, captured in this process (faster)
        capture(str(setup[name]), setup["data"], str(out[name]), CaptureSettings(
            batch_size=1, block_samples=2, dtype="float32", progress=False))
    return {**out, "span": span}


def test_capture_killed_at_random_points_resumes_to_the_clean_cache(setup, caches, tmp_path):
    import cache_store

    clean = files(caches["base"])
    points: set[frozenset] = set()
    for seed in CAPTURE_SEEDS:
        rng = random.Random(seed)
        out = tmp_path / f"seed{seed}.zarr"
        args = capture_args(setup["base"], setup["data"], out)
        for _ in range(KILLS_PER_CHAIN):
            left = caches["span"] - len(files(out)) if out.exists() else caches["span"]  # what a resume still writes
            if not killed_at(args, out, rng.randint(1, max(1, left))):
                break
            points.add(frozenset(files(out)))
            if cache_store.is_complete(str(out)):  # killed at the very end: the data is already the clean cache's
                assert {k: v for k, v in files(out).items() if k != "zarr.json"} == \
                    {k: v for k, v in clean.items() if k != "zarr.json"}
        finish(start(args))  # the same command resumes
        assert files(out) == clean, f"seed {seed}: the resumed cache differs from the clean one"
    print(f"\ncapture: {len(points)} distinct kill points over {len(CAPTURE_SEEDS)} seeds")
    assert len(points) >= 3


def analyze_args(caches: dict, compare: str, out: Path) -> list:
    return ["analyze", "--base", caches["base"], "--compare", f"unl={caches[compare]}", "--outdir", out,
            "--no-progress", "--workers", "1"]


def _run_of(path: Path) -> str:
    """Which cache the marker of a folder (of ``path``'s folders, for a tree) says it was made from."""
    import json

    from unlearn_lens.core.outputs import COMPLETE_MARKER

    folder = path.parent if path.suffix == ".csv" else next(p.parent for p in path.rglob(COMPLETE_MARKER))
    return json.loads((folder / COMPLETE_MARKER).read_text())["inputs"]["caches"]["unl"]


def csvs(root: Path, complete_only: bool = False) -> dict[str, bytes]:
    from unlearn_lens.core.outputs import is_complete

    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.csv"))
            if not complete_only or is_complete(p.parent)}


def test_analyze_killed_at_random_points_never_mixes_and_resumes_to_the_clean_csvs(caches, tmp_path):
    """Every chain starts from a finished analyze of another cache under the same name (the run being
    replaced), so a kill can leave folders of both runs side by side; only this run's may be complete."""
    from unlearn_lens.core.outputs import is_complete

    clean_out, earlier_out = tmp_path / "clean", tmp_path / "earlier"
    span = clean_run(analyze_args(caches, "unl", clean_out), clean_out)
    finish(start(analyze_args(caches, "other", earlier_out)))
    clean, earlier = csvs(clean_out), csvs(earlier_out)
    assert clean and earlier.keys() == clean.keys() and earlier != clean
    runs = {_run_of(clean_out): clean, _run_of(earlier_out): earlier}  # a marker's inputs -> that run's CSVs
    points: set[frozenset] = set()
    for seed in ANALYZE_SEEDS:
        rng = random.Random(100 + seed)
        out = tmp_path / f"seed{seed}"
        shutil.copytree(earlier_out, out)
        args = analyze_args(caches, "unl", out)
        for _ in range(KILLS_PER_CHAIN):
            if not killed_at(args, out, rng.randint(1, span)):
                break
            points.add(frozenset((str(p.relative_to(out)), is_complete(p)) for p in out.rglob("*") if p.is_dir()))
            complete = csvs(out, complete_only=True)
            made_by = {_run_of(out / name) for name in complete}
            assert len(made_by) <= 1, f"seed {seed}: folders of two runs are marked complete side by side"
            for name, data in complete.items():
                assert data == runs[_run_of(out / name)][name], f"seed {seed}: {name} does not hold its run's CSV"
        finish(start(args))
        assert csvs(out) == clean, f"seed {seed}: the resumed analyze wrote other CSVs than a clean run"
    print(f"\nanalyze: {len(points)} distinct kill points over {len(ANALYZE_SEEDS)} seeds")
    assert len(points) >= 2


def test_capture_killed_between_marking_a_split_complete_and_consolidating_is_repaired(setup, caches, tmp_path):
    """The narrowest kill point, which random kills reach only now and then (the suite found it): every
    split marked complete in its own group, the root's consolidated metadata missing or still calling
    the last split incomplete (readers trust it). The same capture command, finding every split
    "already complete", rewrites it: the clean cache's bytes, and readable."""
    import json

    import cache_store
    from cache_store import store as stores

    clean = files(caches["base"])
    missing, stale = tmp_path / "missing.zarr", tmp_path / "stale.zarr"
    for out in (missing, stale):
        shutil.copytree(caches["base"], out)
    stores.drop_consolidated(str(missing))
    document = stale / "zarr.json"
    root = json.loads(document.read_text())
    root["consolidated_metadata"]["metadata"]["wmdp_cloze"]["attributes"]["complete"] = False
    document.write_text(json.dumps(root, indent=2))
    assert not cache_store.is_complete(str(stale), "wmdp_cloze")  # what readers see
    for out in (missing, stale):
        finish(start(capture_args(setup["base"], setup["data"], out)))
        assert files(out) == clean and cache_store.is_complete(str(out))
