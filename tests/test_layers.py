"""The layers of the code (README "Shape of the code") and the torch-free core they stand on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """pyproject's [tool.importlinter] contracts: no model side below, nothing imports cli, no cycles."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def test_core_imports_only_the_standard_library():
    """unlearn_lens.core imports nothing else of the project and nothing outside the standard library."""
    import grimp

    graph = grimp.build_graph("unlearn_lens", include_external_packages=True, cache_dir=None)
    core = {"unlearn_lens.core", *graph.find_descendants("unlearn_lens.core")}
    assert {"unlearn_lens.core.errors", "unlearn_lens.core.naming", "unlearn_lens.core.models",
            "unlearn_lens.core.atomic"} <= core
    outside = {(module, imported) for module in core for imported in graph.find_modules_directly_imported_by(module)
               if imported not in core and imported.split(".")[0] not in sys.stdlib_module_names}
    assert outside == set()


def test_core_loads_without_click_or_numpy_or_torch():
    """The core is usable where neither a CLI framework nor numpy nor torch is installed."""
    code = """
import sys
for name in ("click", "numpy", "torch", "transformers"):
    sys.modules[name] = None  # any import of it fails
from unlearn_lens.core import atomic, errors, models, naming
assert not any(base.__module__.startswith("click") for base in errors.UserError.__mro__)
assert naming.classify("model.layers.3.mlp.down_proj.weight", "llama").role == "down"
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_user_error_is_one_line_and_exit_2(tmp_path):
    """A plain UserError raised inside a command still prints ``error: ...`` and exits with 2."""
    from click.testing import CliRunner

    from cli import group

    result = CliRunner().invoke(group, ["cache", "info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_one_resolver_handles_windows_paths_for_both_sides(monkeypatch, tmp_path):
    """With Windows separators a backslash spec is a (missing) path on the model side and the checkpoint side alike."""
    from analyses.weights.checkpoints import open_checkpoint
    from unlearn_lens.core import models
    from unlearn_lens.core.errors import UserError

    monkeypatch.setattr(models.os, "sep", "\\")
    assert models.looks_like_path("models\\tiny") and not models.looks_like_path("org/name")
    with pytest.raises(UserError, match="no such model"):
        models.resolve_source("models\\tiny")
    with pytest.raises(UserError, match="no such model"):  # not a hub download
        open_checkpoint("models\\tiny")
    assert models.resolve_source("org/name").kind == "hub"


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    from unlearn_lens.core.atomic import atomic_path, atomic_write_text

    target = atomic_write_text(tmp_path / "sub" / "a.txt", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]  # no temporary left behind
    with atomic_path(target, suffix=".npz") as tmp:
        assert tmp.endswith(".npz")
        Path(tmp).write_text("new\n")
    assert target.read_text() == "new\n"
