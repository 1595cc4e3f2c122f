"""The pipeline calls Python: plan() builds settings dataclasses, the same ones the commands build.

Each step's settings are compared with what the command builds from the flags the pipeline
passed before it called Python (its old argv), so a step computes what the command computes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _settings(tmp_path, **extra):
    from unlearn_lens.pipeline import ModelEntry, PipelineSettings

    (tmp_path / "data").mkdir(exist_ok=True)
    return PipelineSettings(outdir=tmp_path / "out", base=ModelEntry("base", "/m/base", "r0"),
                            models=[ModelEntry("ga", "/m/ga", "r1")], data=tmp_path / "data", device="cpu",
                            model_dtype="float32", max_samples=40, max_length=256, batch_size=4, force=True,
                            workers=2, trust_remote_code=True, relearn=True, attacks=True,
                            attack_options={"relearn_steps": 5, "ablate_k": (1, 4)}, **extra)


def _no_argv(value) -> bool:
    if isinstance(value, str):
        return not value.startswith("--")
    if isinstance(value, (list, tuple)):
        return all(_no_argv(v) for v in value)
    if isinstance(value, dict):
        return all(_no_argv(v) for v in value.values())
    if dataclasses.is_dataclass(value):
        return all(_no_argv(getattr(value, f.name)) for f in dataclasses.fields(value))
    return True


def test_plan_builds_settings_dataclasses_not_argv(tmp_path):
    from unlearn_lens.pipeline import plan

    steps = plan(_settings(tmp_path))
    assert [s.id.split(":")[0] for s in steps] == ["capture", "capture", "params", "analyze", "lipschitz",
                                                   "tuned-lens", "tuned-lens", "relearn", "attack"]
    for step in steps:
        assert dataclasses.is_dataclass(step.settings) and not isinstance(step.settings, type), step.id
        assert callable(step.function) and _no_argv(step.settings), step.id


def test_demo_steps_build_settings_too(tmp_path):
    from unlearn_lens.demo import TESTBED_FACTS, demo_settings, demo_steps

    settings = demo_settings(tmp_path, "rmu,ga,simnpo", "wmdp-demo", max_samples=6)
    steps = demo_steps(settings, None, "original", "wmdp-demo")
    assert [s.id for s in steps] == ["model:smollm2", "datasets", "model:rmu", "model:ga", "model:simnpo"]
    assert all(dataclasses.is_dataclass(s.settings) and _no_argv(s.settings) for s in steps)
    assert steps[1].settings.source == "demo" and steps[1].settings.outdir == str(tmp_path / "data")
    assert settings.base.name == "smollm2" and steps[0].settings.out == settings.base.spec
    # the default: the planted-facts testbed, planted into SmolLM2, whose planted copy is the base
    settings = demo_settings(tmp_path, "rmu,ga", max_samples=6)
    steps = demo_steps(settings, None, "original")
    assert [s.id for s in steps] == ["model:smollm2", "datasets", "plant", "model:rmu", "model:ga"]
    assert (steps[1].settings.source, steps[1].settings.facts) == ("testbed", TESTBED_FACTS)
    plant = steps[2].settings
    assert (plant.model.spec, plant.data) == (steps[0].settings.out, str(tmp_path / "data"))
    assert settings.base.name == "planted" and settings.base.spec == str(Path(plant.outdir) / "model")
    assert all(s.settings.model == settings.base.spec for s in steps[3:])


def test_the_lipschitz_policy_is_in_plan(tmp_path):
    """Lipschitz reads at most LIPSCHITZ_MAX_LENGTH tokens; shorter --max-length is kept."""
    from unlearn_lens.pipeline import LIPSCHITZ_MAX_LENGTH, plan

    long_texts = next(s for s in plan(_settings(tmp_path)) if s.id == "lipschitz:ga").settings
    assert LIPSCHITZ_MAX_LENGTH == 128 and long_texts.max_length == 128
    settings = _settings(tmp_path)
    settings.max_length = 64
    assert next(s for s in plan(settings) if s.id == "lipschitz:ga").settings.max_length == 64


def test_the_demo_shortens_lipschitz_only_in_the_demo(tmp_path):
    """The demo's Lipschitz step draws DEMO_LIPSCHITZ_SETTINGS' directions; a plain pipeline the command's."""
    from unlearn_lens.demo import DEMO_LIPSCHITZ_SETTINGS, demo_settings
    from unlearn_lens.lipschitz import LipschitzSettings
    from unlearn_lens.pipeline import plan

    demo = next(s for s in plan(demo_settings(tmp_path, "rmu")) if s.id == "lipschitz:rmu").settings
    plain = next(s for s in plan(_settings(tmp_path)) if s.id == "lipschitz:ga").settings
    assert demo.n_perturb == DEMO_LIPSCHITZ_SETTINGS["n_perturb"] == 4
    assert plain.n_perturb == LipschitzSettings.n_perturb == 8


# --- each step's settings equal the command's from the pipeline's former argv -------------------------

def _captured(monkeypatch, module, function, argv, result=None):
    """Run ``unlearn-lens ARGV`` with ``module.function`` replaced; return the settings it was called with."""
    import importlib

    from cli import group

    calls = []

    def fake(settings, *args, **kwargs):
        calls.append(settings)
        return result

    monkeypatch.setattr(importlib.import_module(module), function, fake)
    outcome = CliRunner().invoke(group, [str(a) for a in argv])
    assert outcome.exit_code == 0, outcome.output
    assert len(calls) == 1
    return calls[0]


def test_every_step_equals_its_command(tmp_path, monkeypatch):
    from unlearn_lens.pipeline import plan

    s = _settings(tmp_path)
    steps = {step.id: step.settings for step in plan(s)}
    out, data = s.outdir, s.data
    caches = out / "caches"
    common = ["--device", "cpu", "--dtype", "float32"]
    former = {
        "capture:ga": ("unlearn_lens.capture", "run_capture",
                       ["capture", "--model", "/m/ga", "--revision", "r1", "--data", data, "--out", caches / "ga.zarr",
                        "--max-samples", 40, "--max-length", 256, "--batch-size", 4, "--dtype", "float16",
                        "--model-dtype", "float32", "--device", "cpu", "--trust-remote-code", "--overwrite"], {}),
        "params:ga": ("analyses.weights.params_step", "run_params_step",
                      ["params", "--model-a", "/m/base", "--model-b", "/m/ga", "--outdir", out / "base__to__ga",
                       "--revision-a", "r0", "--revision-b", "r1", "--workers", 2, "--force"],
                      {"skipped": True}),
        "analyze": ("analyses.activations.analyze_step", "run_analyze",
                    ["analyze", "--base", caches / "base.zarr", "--base-name", "base", "--outdir", out,
                     "--compare", f"ga={caches / 'ga.zarr'}", "--workers", 2],
                    {"comparisons": {}, "models": {}, "seconds": {}}),
        "lipschitz:ga": ("unlearn_lens.lipschitz", "run_lipschitz",
                         ["lipschitz", "--model-a", "/m/base", "--revision", "r0", "--model-b", "/m/ga",
                          "--name-a", "base", "--name-b", "ga", "--data", data, "--outdir", out,
                          "--eps", "1e-3,1e-2", "--max-samples", 64, "--max-length", 128, *common,
                          "--revision-b", "r1", "--trust-remote-code", "--overwrite"], "folder"),
        "tuned-lens:base": ("unlearn_lens.tuned_lens", "run_tuned_lens",
                            ["tuned-lens", "--model", "/m/base", "--revision", "r0", "--name", "base", "--data", data,
                             "--outdir", out, "--steps", 250, "--tokens-per-step", 512, "--cache",
                             caches / "base.zarr", *common, "--trust-remote-code", "--overwrite"], "folder"),
        "relearn:ga": ("unlearn_lens.relearn", "run_relearn",
                       ["relearn", "--model", "/m/ga", "--revision", "r1", "--base-model", "/m/base",
                        "--base-revision", "r0", "--name", "ga", "--data", data, "--outdir", out,
                        "--max-samples", 40, "--max-length", 256, "--eval-batch-size", 4, *common,
                        "--trust-remote-code", "--overwrite"], "folder"),
        "attack:ga": ("unlearn_lens.attacks.runner", "run_attacks",
                      ["attack", "--base", "/m/base", "--model", "/m/ga", "--name", "ga", "--data", data,
                       "--outdir", out, "--cache-base", caches / "base.zarr", "--cache-model", caches / "ga.zarr",
                       "--base-revision", "r0", "--model-revision", "r1", "--max-samples", 40, "--max-length", 256,
                       "--batch-size", 4, *common, "--option", "relearn_steps=5", "--option", "ablate_k=1,4",
                       "--trust-remote-code", "--overwrite"], "folder"),
    }
    former["attack:ga"][2][former["attack:ga"][2].index("--model-revision")] = "--revision"  # attack's flag
    for step_id, (module, function, argv, result) in former.items():
        built = _captured(monkeypatch, module, function, argv, result)
        assert built == steps[step_id], step_id


def test_the_demo_unlearn_config_equals_the_command(tmp_path, monkeypatch):
    """demo_steps' UnlearnConfig = `unlearn` with the demo's former flags (the preset fills the rest)."""
    from unlearn_lens.demo import demo_settings, demo_steps

    settings = demo_settings(tmp_path, "rmu,npo", "wmdp-demo", device="cpu", force=True)
    data, rmu_out = settings.data_dir, tmp_path / "unlearning" / "rmu"
    steps = {s.id: s.settings for s in demo_steps(settings, None, "original", "wmdp-demo")}
    head = ["unlearn", "--model", settings.base.spec, "--data", data, "--device", "cpu", "--batch-size", 4,
            "--max-length", 128, "--seed", 0]
    original = _captured(monkeypatch, "unlearn_lens.unlearning.trainer", "run_unlearning",
                         [*head, "--method", "rmu", "--outdir", rmu_out, "--layer-id", 7, "--steering-coeff", 20,
                          "--alpha", 100, "--lr", 1e-3, "--steps", 20, "--overwrite"], Path("x"))
    assert original == steps["model:rmu"]
    reference = {s.id: s.settings for s in demo_steps(settings, 5, "reference")}
    by_preset = _captured(monkeypatch, "unlearn_lens.unlearning.trainer", "run_unlearning",
                          [*head, "--method", "npo", "--outdir", tmp_path / "unlearning" / "npo", "--preset",
                           "reference", "--steps", 5, "--overwrite"], Path("x"))
    assert by_preset == reference["model:npo"]
    # on the testbed, a method's own settings (RMU at layer 3, every linear map of blocks 0-3) are the demo's
    settings = demo_settings(tmp_path, "rmu", device="cpu", force=True)
    testbed = {s.id: s.settings for s in demo_steps(settings, None, "original")}
    rmu = _captured(monkeypatch, "unlearn_lens.unlearning.trainer", "run_unlearning",
                    ["unlearn", "--model", settings.base.spec, "--data", data, "--device", "cpu", "--max-length", 128,
                     "--batch-size", 4, "--seed", 0, "--method", "rmu", "--outdir", tmp_path / "unlearning" / "rmu",
                     "--layer-id", 3, "--steering-coeff", 100, "--alpha", 5, "--lr", 5e-4, "--lr-scheduler",
                     "constant", "--steps", 120, "--update-layers", "0,1,2,3", "--update-roles",
                     "q,k,v,out,up,gate,down", "--overwrite"], Path("x"))
    assert rmu == testbed["model:rmu"] and rmu.update_layers == [0, 1, 2, 3]


# --- the layers ----------------------------------------------------------------------------------------

def test_nothing_imports_cli_with_no_exception():
    """The import-linter contract "nothing imports the command line" holds with no ignored edge."""
    import grimp
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    contract = next(c for c in config if c["forbidden_modules"] == ["cli"] if c["type"] == "forbidden")
    assert "ignore_imports" not in contract
    graph = grimp.build_graph("unlearn_lens", "analyses", "cache_store", include_external_packages=True,
                              cache_dir=None)
    assert "cli" not in graph.modules  # an imported outside module would be in the graph


def test_option_bundles_import_only_click_and_the_core():
    """analyses' commands may import unlearn_lens.options (pyproject), so it must stand on the core alone."""
    import grimp

    graph = grimp.build_graph("unlearn_lens", include_external_packages=True, cache_dir=None)
    imported = graph.find_modules_directly_imported_by("unlearn_lens.options")
    assert {m for m in imported if not m.startswith("unlearn_lens.core")
            and m.split(".")[0] not in sys.stdlib_module_names} == {"click"}


def test_a_default_is_declared_once():
    """Commands that share a default take it from the one constant (changing it changes them all)."""
    import click

    from cli import group
    from unlearn_lens.core import settings as core

    context = click.Context(group)
    lengths = {name: next(p.default for p in group.get_command(context, name).params if p.name == "max_length")
               for name in ("eval", "relearn", "attack", "capture", "unlearn", "pipeline", "lipschitz", "tuned-lens")}
    assert lengths == {**dict.fromkeys(("eval", "relearn", "attack", "capture", "unlearn", "pipeline"),
                                       core.DEFAULT_MAX_LENGTH),
                       "lipschitz": core.SHORT_MAX_LENGTH, "tuned-lens": core.SHORT_MAX_LENGTH}
    import re

    code = [p for root in ("unlearn_lens", "analyses") for p in (ROOT / root).rglob("*.py")]
    written = [(p.name, line) for p in code for line in p.read_text().splitlines()
               if re.search(r"max_length\b[^\n]*=\s*(512|128)\b|max.length.*default=(512|128)\b", line, re.I)]
    assert written == [("settings.py", "DEFAULT_MAX_LENGTH = 512"), ("settings.py", "SHORT_MAX_LENGTH = 128")]
