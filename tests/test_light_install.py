"""The base install (no extras) is the reading side: in a fresh venv where torch cannot be imported,
``analyze``, ``params``, ``cache info|verify`` and ``report`` run on caches and checkpoints written
by the full install and give the same CSVs; a model-side command says which extra to install.

The venv is built offline: ``python -m venv`` (its own pip from ensurepip), the project installed
from a wheel built here with ``--no-deps``, and its dependencies taken from the distributions
already installed on this machine, resolved from ``pyproject.toml``'s ``dependencies`` through
each distribution's own requirements (markers and extras evaluated) and linked into the venv's
site-packages. So nothing is downloaded, and a dependency missing from the base list is missing
in the venv too (what a real ``pip install unlearn-lens`` on a CPU node would give).
"""

from __future__ import annotations

import csv
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from test_analyze_e2e import plant_mlp_change, write_data

ROOT = Path(__file__).resolve().parents[1]
MODEL_SIDE = ("torch", "transformers", "nnsight", "peft", "accelerate", "datasets", "torchao")
PROJECT_FILES = ("pyproject.toml", "README.md", "cli.py", "unlearn_lens", "cache_store", "analyses")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_base_distributions() -> dict[str, metadata.Distribution]:
    """The installed distributions that ``pip install .`` (no extras) would bring, by name."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    queue = [(Requirement(text), "") for text in requirements]
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    while queue:
        requirement, extra = queue.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = _canonical(requirement.name)
        for wanted_extra in sorted(requirement.extras) or [""]:
            if (name, wanted_extra) in seen:
                continue
            seen.add((name, wanted_extra))
            distribution = found.get(name) or metadata.distribution(requirement.name)
            found[name] = distribution
            queue += [(Requirement(text), wanted_extra) for text in distribution.requires or []]
    return found


def link_distributions(distributions, site_packages: Path) -> None:
    """Symlink each distribution's top-level files (packages, modules, .dist-info) into the venv."""
    for distribution in distributions:
        for file in distribution.files or []:
            top = file.parts[0]
            if top == ".." or top == "__pycache__":  # console scripts outside site-packages; caches
                continue
            target, link = Path(distribution.locate_file(top)), site_packages / top
            if not link.exists() and target.exists():
                link.symlink_to(target)


def build_wheel(tmp: Path) -> Path:
    """A wheel of this checkout (copied first, so the build leaves nothing in the work tree)."""
    source = tmp / "source"
    source.mkdir()
    for name in PROJECT_FILES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    return next((tmp / "wheel").glob("unlearn_lens-*.whl"))


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("light-install")
    venv = tmp / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot create a venv with pip here (python -m venv / ensurepip failed: {exc})")
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    distributions = resolve_base_distributions()
    assert not set(MODEL_SIDE) & set(distributions), "a base dependency pulls the model side"
    link_distributions(distributions.values(), site_packages)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(build_wheel(tmp))],
                   check=True, capture_output=True, timeout=300)
    return venv


def clean_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=str(cwd), env=env or clean_env(), capture_output=True, text=True, timeout=600)


def run_base(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``unlearn-lens ARGS`` from the base install's console script."""
    return run([str(venv / "bin" / "unlearn-lens"), *args], cwd)


def run_full(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``unlearn-lens ARGS`` from this checkout in the full (test) environment."""
    env = clean_env() | {"PYTHONPATH": str(ROOT)}
    return run([sys.executable, "-c", "import cli; cli.main()", *args], cwd, env)


@pytest.fixture(scope="module")
def written_by_full_install(tmp_path_factory):
    """Two tiny Llama checkpoints (one with a planted MLP change) and their caches."""
    from unlearn_lens.capture import CaptureSettings, capture
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("full-install")
    base = save_tiny_model("llama", root / "base")
    modified = plant_mlp_change(Path(base), root / "modified", "llama", 1)
    data = write_data(root / "data")
    settings = CaptureSettings(batch_size=4, block_samples=4, dtype="float32", progress=False, token_chunk=16)
    caches = {}
    for name, model in (("base", base), ("unl", modified)):
        caches[name] = root / f"{name}.zarr"
        assert set(capture(str(model), data, str(caches[name]), settings).values()) == {"complete"}
    return root, Path(base), modified, caches


def csv_files(folder: Path) -> dict[str, list[list[str]]]:
    result = {}
    for path in sorted(folder.rglob("*.csv")):
        with open(path, newline="") as handle:
            result[str(path.relative_to(folder))] = list(csv.reader(handle))
    return result


@pytest.mark.slow
def test_base_install_has_no_model_side(base_venv, tmp_path):
    for module in MODEL_SIDE:
        result = run([str(base_venv / "bin" / "python"), "-c", f"import {module}"], tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, module
    help_text = run_base(base_venv, ["--help"], tmp_path)
    assert help_text.returncode == 0 and "analyze" in help_text.stdout, help_text.stderr


@pytest.mark.slow
def test_model_side_command_names_the_extra(base_venv, written_by_full_install, tmp_path):
    root, base, _, _ = written_by_full_install
    result = run_base(base_venv, ["capture", "--model", str(base), "--data", str(root / "data"),
                                  "--out", str(tmp_path / "c.zarr")], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines == ["error: unlearn-lens capture needs the model side: pip install 'unlearn-lens[models]'"], result.stderr


@pytest.mark.slow
def test_reading_side_gives_the_same_outputs_without_torch(base_venv, written_by_full_install, tmp_path):
    root, base, modified, caches = written_by_full_install
    outputs = {}
    for side, runner in (("full", run_full), ("base", lambda args, cwd: run_base(base_venv, args, cwd))):
        out = tmp_path / side
        steps = {
            "analyze": ["analyze", "--no-progress", "--base", str(caches["base"]), "--compare", f"unl={caches['unl']}",
                        "--outdir", str(out), "--top-k", "4", "--workers", "1"],
            "params": ["params", "--model-a", str(base), "--model-b", str(modified), "--outdir", str(out / "params"),
                       "--seed", "1", "--workers", "1", "--num-matrices", "3"],
            "cache info": ["cache", "info", str(caches["base"])],
            "cache verify": ["cache", "verify", str(caches["unl"])],
            "report": ["report", "--outdir", str(out)],
        }
        printed = {}
        for step, args in steps.items():
            result = runner(args, tmp_path)
            assert result.returncode == 0, (side, step, result.stderr[-3000:])
            printed[step] = result.stdout.replace(str(out), "OUT")
        assert (out / "report.html").is_file()
        outputs[side] = (csv_files(out), printed)
    full_csvs, full_printed = outputs["full"]
    base_csvs, base_printed = outputs["base"]
    assert len(full_csvs) >= 8 and set(base_csvs) == set(full_csvs)
    for name in full_csvs:  # same code, same numerical libraries: the same bytes, value for value
        assert base_csvs[name] == full_csvs[name], name
    for step in ("cache info", "cache verify"):
        assert base_printed[step] == full_printed[step], step


def test_missing_model_side_message_names_the_extra():
    from cli import missing_model_side

    for module in MODEL_SIDE:
        error = missing_model_side(ModuleNotFoundError(f"No module named '{module}'", name=f"{module}.sub"), "eval")
        assert error.message == "unlearn-lens eval needs the model side: pip install 'unlearn-lens[models]'"
    assert missing_model_side(ModuleNotFoundError("No module named 'zarr'", name="zarr"), "analyze") is None
    assert missing_model_side(ImportError("cannot import name 'x' from 'torch'", name="torch")) is None
