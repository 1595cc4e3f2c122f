"""Every reader checks what it combines (issue #25): checkpoint weights against the fingerprint their
cache recorded, every input's identity (content, not a possibly stale record) in each completion
marker, so a finished folder made from other inputs is recomputed and never mixed with this run's,
and ``report`` reads only folders marked complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import group
from test_analyze_e2e import plant_mlp_change
from test_capture import write_data
from unlearn_lens.core import outputs

BASE, NAME = "base", "unl"


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(group, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """A base tiny llama, an unlearned-like copy (block 1's MLP inputs changed) and an unrelated model
    (another seed), each captured once."""
    from unlearn_lens.capture import CaptureSettings, capture
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("inputs-checked")
    data = write_data(root / "data")
    base = save_tiny_model("llama", root / "base")
    models = {"base": base, "unl": plant_mlp_change(base, root / "unl", "llama", 1),
              "other": save_tiny_model("llama", root / "other", seed=1)}
    settings = CaptureSettings(splits=("forget", "retain", "wmdp", "wmdp_cloze"), max_samples=8, batch_size=4,
                               block_samples=4, dtype="float32", progress=False)
    caches = {}
    for name, model in models.items():
        caches[name] = root / f"{name}.zarr"
        capture(str(model), data, str(caches[name]), settings)
    return {"root": root, "data": data, "models": models, "caches": caches, "settings": settings}


def analyze(study, out, compare="unl", *extra) -> tuple[int, str]:
    return invoke("analyze", "--base", study["caches"]["base"], "--compare", f"{NAME}={study['caches'][compare]}",
                  "--base-name", BASE, "--outdir", out, "--no-progress", "--workers", "1", *extra)


# --- checkpoint weights against the cache's fingerprint ---------------------------------------------

def test_a_checkpoint_with_another_models_weights_is_refused_naming_both_fingerprints(study, tmp_path):
    from analyses.weights.checkpoints import open_checkpoint
    from cache_store import open_cache

    recorded = open_cache(str(study["caches"]["unl"]), "forget").attrs["checkpoint_fingerprint"]
    wrong = open_checkpoint(str(study["models"]["base"])).fingerprint()
    assert recorded == open_checkpoint(str(study["models"]["unl"])).fingerprint() != wrong
    code, output = analyze(study, tmp_path / "out", "unl", "--checkpoint", f"{NAME}={study['models']['base']}")
    assert code == 2 and output.startswith("error: ") and len(output.strip().splitlines()) == 1, output
    assert wrong in output and recorded in output and "--allow-mismatch" in output
    assert not (tmp_path / "out").exists()  # refused before anything is written

    code, output = analyze(study, tmp_path / "on-purpose", "unl", "--checkpoint", f"{NAME}={study['models']['base']}",
                           "--allow-mismatch")
    assert code == 0, output
    assert f"note: {NAME}: compared with weights other than those captured" in output
    marker = json.loads((tmp_path / "on-purpose" / f"{BASE}__to__{NAME}" / outputs.ROW_SPACE /
                         outputs.COMPLETE_MARKER).read_text())
    assert marker["inputs"]["weights"][NAME] == wrong  # the weights actually combined are recorded

    moved = tmp_path / "copied" / "unl"  # the same weights on another machine: accepted
    shutil.copytree(study["models"]["unl"], moved)
    code, output = analyze(study, tmp_path / "moved", "unl", "--checkpoint", f"{NAME}={moved}")
    assert code == 0, output


def test_a_model_retrained_in_place_after_its_capture_is_refused(study, tmp_path):
    from unlearn_lens.capture import capture

    model = tmp_path / "model"
    shutil.copytree(study["models"]["unl"], model)
    cache = tmp_path / "unl.zarr"
    capture(str(model), study["data"], str(cache), study["settings"])
    shutil.copy(study["models"]["other"] / "model.safetensors", model / "model.safetensors")  # retrained in place
    code, output = invoke("analyze", "--base", study["caches"]["base"], "--compare", f"{NAME}={cache}",
                          "--outdir", tmp_path / "out", "--no-progress", "--workers", "1")
    assert code == 2 and "is not the checkpoint its cache was captured from" in output and str(model) in output


# --- completion markers record their inputs ----------------------------------------------------------

def _csvs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.csv"))}


def _complete_csvs(root: Path) -> dict[str, bytes]:
    return {name: data for name, data in _csvs(root).items() if outputs.is_complete((root / name).parent)}


def test_an_analyze_rerun_with_another_cache_gives_a_fresh_runs_csvs_even_when_killed(study, tmp_path, monkeypatch):
    """Run 1 compares with one cache; run 2, into the same folder with another cache under the same
    name, is killed half way (after its first folders); what is marked complete is then only run 2's,
    `report` leaves the rest out and says so, and finishing run 2 gives exactly a fresh run's CSVs."""
    import analyses.activations.runner as runner

    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert analyze(study, fresh, "other")[0] == 0
    assert analyze(study, out, "unl")[0] == 0
    assert _csvs(out).keys() == _csvs(fresh).keys() and _csvs(out) != _csvs(fresh)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # run 2 stops after writing activation_stats and activation_separation

    with monkeypatch.context() as patch:
        patch.setattr(runner, "write_covariance", killed)
        code, _ = analyze(study, out, "other")
    assert code != 0
    finished = _complete_csvs(out)
    assert finished and all(finished[name] == _csvs(fresh)[name] for name in finished)  # never run 1's
    assert any(name.startswith(f"{BASE}__to__{NAME}/{outputs.ACTIVATION_STATS}") for name in finished)
    assert not any(outputs.COVARIANCE in name or outputs.PROBES in name for name in finished)

    code, output = invoke("report", "--outdir", out)
    assert code == 0 and "not marked complete" in output and f"{BASE}__to__{NAME}/{outputs.COVARIANCE}" in output

    assert analyze(study, out, "other")[0] == 0
    assert _csvs(out) == _csvs(fresh)
    from cache_store.identity import cache_identity

    markers = [json.loads(path.read_text()) for path in out.rglob(outputs.COMPLETE_MARKER)]
    assert len(markers) == 9  # 5 comparison folders, probes and logit lens of both models
    assert all(m["inputs"]["caches"][NAME] == cache_identity(str(study["caches"]["other"])) for m in markers)


def test_a_finished_folder_made_from_other_data_content_is_recomputed(study, tmp_path):
    """`eval` skips a finished folder, but only for the same inputs: forget.txt edited by hand (the
    manifest, a record, still says the old hash) makes it recompute."""
    data = tmp_path / "data"
    shutil.copytree(study["data"], data)
    args = ["eval", "--model", study["models"]["base"], "--name", "m", "--data", data, "--outdir", tmp_path / "out",
            "--max-samples", "4", "--max-length", "32"]
    assert invoke(*args)[0] == 0
    results = tmp_path / "out" / "m" / outputs.EVALUATION / outputs.EVAL_CSV
    before = results.read_bytes()
    assert invoke(*args)[0] == 0 and results.read_bytes() == before  # same inputs: left alone
    forget = data / "forget.txt"
    forget.write_text("\n".join(reversed(forget.read_text().splitlines())) + "\n")
    assert json.loads((data / "manifest.json").read_text())  # the manifest is unchanged
    assert invoke(*args)[0] == 0 and results.read_bytes() != before


def test_params_recomputes_a_model_rewritten_in_place(study, tmp_path):
    from analyses.weights.params import run_params

    model = tmp_path / "unl"
    shutil.copytree(study["models"]["unl"], model)
    out = tmp_path / "out"
    run_params(str(study["models"]["base"]), str(model), out, steps=("stats",))
    assert run_params(str(study["models"]["base"]), str(model), out, steps=("stats",)).get("skipped")
    shutil.copy(study["models"]["other"] / "model.safetensors", model / "model.safetensors")
    again = run_params(str(study["models"]["base"]), str(model), out, steps=("stats",))
    assert not again.get("skipped") and again["steps"] == ["stats"]


def test_the_pipeline_reruns_a_step_whose_inputs_changed(study, tmp_path):
    from unlearn_lens.pipeline import STEP_KINDS, ModelEntry, PipelineSettings, Step, run_pipeline

    data = tmp_path / "data"
    shutil.copytree(study["data"], data)
    calls = []
    step = Step("probe", lambda settings: calls.append(settings), {"option": 1}, data=str(data),
                models=[("m", str(study["models"]["base"]), None)])
    settings = PipelineSettings(tmp_path / "out", ModelEntry("base", "x"), [], data=data, skip=frozenset(STEP_KINDS))
    lines: list[str] = []
    run_pipeline(settings, echo=lines.append, pre_steps=[step])
    run_pipeline(settings, echo=lines.append, pre_steps=[step])
    assert len(calls) == 1 and any("already done" in line for line in lines)
    (data / "retain.txt").write_text("Another retain text entirely.\n")
    run_pipeline(settings, echo=lines.append, pre_steps=[step])
    assert len(calls) == 2 and any("its inputs changed since it ran" in line for line in lines)
