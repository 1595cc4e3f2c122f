"""The output tree's one owner (unlearn_lens/core/outputs.py, OUTPUTS.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["base", "ga", "SmolLM2-135M.Q4_1", "rmu_v2", "a__b"])
def test_model_names_that_are_folder_names_are_accepted(name):
    assert outputs.check_model_name(name) == name
    base, modified = outputs.parse_comparison_name(outputs.comparison_name("base", name))
    assert (base, modified) == ("base", name)  # the folder name reads back unambiguously


@pytest.mark.parametrize("name", ["a__to__b", "", "a b", "a/b", "..", "-x", "_x", "a\\b", None])
def test_model_names_that_break_the_tree_are_refused(name):
    with pytest.raises(UserError, match="--name"):
        outputs.check_model_name(name)


def test_every_validator_is_the_one_rule(tmp_path):
    """pipeline NAME=, analyze --compare NAME=, relearn/eval/attack --name, lipschitz, tuned lens."""
    from analyses.activations.caches import parse_compare
    from unlearn_lens.core.settings import ModelRef
    from unlearn_lens.lipschitz import LipschitzSettings, run_lipschitz
    from unlearn_lens.pipeline import ModelEntry
    from unlearn_lens.tuned_lens import validate_options

    with pytest.raises(UserError, match="model name 'a__to__b'"):
        ModelEntry.parse("a__to__b=/x")
    with pytest.raises(UserError, match="a__to__b"):
        parse_compare(["a__to__b=x.zarr"], "base")
    assert list(parse_compare(["a__b=x.zarr"], "base")) == ["a__b"]
    with pytest.raises(UserError, match="--name 'a__to__b'"):
        validate_options(steps=1, lr=1e-3, tokens_per_step=8, batch_size=1, max_length=8, max_samples=None,
                         train_split="forget", name="a__to__b")
    with pytest.raises(UserError, match="--name-b 'a__to__b'"):
        run_lipschitz(LipschitzSettings(ModelRef("x"), ModelRef("y"), name_a="base", name_b="a__to__b",
                                        data=str(tmp_path), outdir=str(tmp_path)))


def test_tuned_lens_cli_refuses_a_comparison_name(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "tuned-lens", "--model", str(tmp_path), "--name", "a__to__b",
                             "--data", str(tmp_path), "--outdir", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                                          "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: --name 'a__to__b'") and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_old_marker_names_still_mark_a_folder_complete(tmp_path):
    """Folders finished by older runs (``COMPLETE`` of unlearn, ``_COMPLETE`` elsewhere) are recognised."""
    from analyses.io import is_complete as analyses_is_complete
    from analyses.io import mark_complete
    from unlearn_lens.unlearning.trainer import is_complete as run_is_complete

    old_run, folder = tmp_path / "ga", tmp_path / "activation_stats"
    old_run.mkdir()
    (old_run / "COMPLETE").write_text("2026-01-01T00:00:00Z\n")
    assert run_is_complete(old_run) and outputs.is_complete(old_run)
    assert not outputs.is_complete(folder)
    mark_complete(folder, {"step": "x"})
    assert (folder / "_COMPLETE").read_text() == '{\n  "step": "x"\n}\n'
    assert analyses_is_complete(folder) and run_is_complete(folder)
    outputs.clear_complete(folder), outputs.clear_complete(old_run)
    assert not outputs.is_complete(folder) and not outputs.is_complete(old_run)


def test_outputs_md_lists_every_folder_the_module_names():
    text = (ROOT / "OUTPUTS.md").read_text()
    for folder in (*outputs.COMPARISON_FOLDERS, *outputs.MODEL_FOLDERS, outputs.CACHES, outputs.DATA,
                   outputs.UNLEARNING, outputs.PIPELINE_RECORDS, outputs.REPORT, outputs.COMPLETE_MARKER,
                   outputs.RUN_MARKER):
        assert re.search(rf"`{re.escape(folder)}/?`", text), folder


def test_no_producer_builds_the_comparison_name_itself():
    """``<base>__to__<name>`` is built only in core/outputs.py (docstrings and help texts aside)."""
    offenders = []
    for path in [*ROOT.glob("unlearn_lens/**/*.py"), *ROOT.glob("analyses/**/*.py"), ROOT / "cli.py"]:
        if path.name == "outputs.py" and path.parent.name == "core":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""f["'][^"']*\}__to__\{|split\(["']__to__|["']_?COMPLETE["']""", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
