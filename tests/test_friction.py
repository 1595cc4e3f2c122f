"""What a new user meets first: names derived by one rule, a data folder without a manifest, and a
pipeline that checks its inputs before running anything."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from test_analyze_e2e import write_data
from unlearn_lens.core.outputs import default_name


def without_manifest(path: Path) -> Path:
    """A researcher's own data folder: forget.txt, retain.txt and wmdp_mcq.jsonl, no manifest.json."""
    write_data(path)
    (path / "manifest.json").unlink()
    return path


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """``unlearn-lens ARGS`` in this process: exit status and stderr lines."""
    from cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base model and an 'unlearned' one saved as RUN/ga/model (as `unlearn` writes it)."""
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("friction")
    return save_tiny_model("llama", root / "base"), save_tiny_model("llama", root / "runs" / "ga" / "model")


def test_lipschitz_and_tuned_lens_name_the_model_as_eval_does(models, tmp_path, capsys):
    base, unlearned = models
    data, out = without_manifest(tmp_path / "data"), tmp_path / "out"
    assert default_name(str(unlearned)) == "ga"
    code, err = run_cli(["lipschitz", "--model-a", str(base), "--model-b", str(unlearned), "--data", str(data),
                         "--outdir", str(out), "--n-perturb", "2", "--max-samples", "2", "--max-length", "8",
                         "--eps", "1e-2"], capsys)
    assert code == 0, err
    assert (out / "base__to__ga" / "lipschitzness" / "_COMPLETE").is_file()
    code, err = run_cli(["tuned-lens", "--model", str(unlearned), "--data", str(data), "--outdir", str(out),
                         "--steps", "0", "--max-samples", "2", "--max-length", "16"], capsys)
    assert code == 0, err
    folder = out / "ga" / "wmdp_tuned_lens"
    assert (folder / "_COMPLETE").is_file() and json.loads((folder / "config.json").read_text())["name"] == "ga"


def test_pipeline_names_models_by_the_same_rule():
    from unlearn_lens.pipeline import ModelEntry

    for spec in ("/runs/ga/model", "EleutherAI/deep-ignorance-unfiltered", "/models/smol.gguf", "./a b/c/"):
        assert ModelEntry.parse(spec).name == default_name(spec)


def test_capture_hashes_a_data_folder_without_manifest(models, tmp_path):
    import zarr

    from unlearn_lens.capture import CaptureSettings, capture

    base, _ = models
    data = without_manifest(tmp_path / "data")
    lines = []
    import unlearn_lens.data as data_module

    expected = hashlib.sha256(json.dumps(
        {name: hashlib.sha256((data / name).read_bytes()).hexdigest()
         for name in ("forget.txt", "retain.txt", "wmdp_mcq.jsonl")}, sort_keys=True).encode()).hexdigest()
    assert data_module.data_hash(data, echo=lines.append) == expected
    assert lines == [f"{data}: no manifest.json; data hash {expected[:12]} is the SHA-256 of "
                     "forget.txt, retain.txt, wmdp_mcq.jsonl"]
    settings = CaptureSettings(batch_size=4, block_samples=4, dtype="float32", progress=False, token_chunk=16)
    out = tmp_path / "c.zarr"
    assert set(capture(str(base), data, str(out), settings).values()) == {"complete"}
    assert zarr.open_group(str(out), mode="r").attrs["data_manifest_hash"] == expected
    # a manifest written by `datasets create` holds the same hash for the same files
    from unlearn_lens.data import files_hash

    assert files_hash({name: hashlib.sha256((data / name).read_bytes()).hexdigest()
                       for name in ("forget.txt", "retain.txt", "wmdp_mcq.jsonl")}) == expected


def test_capture_of_a_folder_with_no_data_files_is_one_line(models, tmp_path, capsys):
    base, _ = models
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["capture", "--model", str(base), "--data", str(tmp_path / "empty"),
                         "--out", str(tmp_path / "c.zarr")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "forget.txt" in err[0]


@pytest.mark.parametrize("case", ["missing_local_model", "path_like_typo", "uncached_hub_id_offline",
                                  "missing_data_dir", "data_file_missing"])
def test_pipeline_checks_every_input_before_the_first_step(case, models, tmp_path, capsys, monkeypatch):
    base, unlearned = models
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = without_manifest(tmp_path / "data")
    model = {"missing_local_model": f"typo={tmp_path / 'runs' / 'gaa' / 'model'}",
             "path_like_typo": "typo=runs/ga/modle",
             "uncached_hub_id_offline": "typo=NoSuchOrg/no-such-model-xyz"}.get(case, f"ga={unlearned}")
    if case == "missing_data_dir":
        data = tmp_path / "no-such-data"
    elif case == "data_file_missing":
        (data / "wmdp_mcq.jsonl").unlink()
    out = tmp_path / "out"
    code, err = run_cli(["pipeline", "--base", f"base={base}", "--model", model, "--data", str(data),
                         "--outdir", str(out), "--max-samples", "2", "--max-length", "8"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    expected = {"missing_local_model": "model typo", "path_like_typo": "runs/ga/modle",
                "uncached_hub_id_offline": "hub cache", "missing_data_dir": "no such directory",
                "data_file_missing": "wmdp_mcq.jsonl"}[case]
    assert expected in err[0]
    assert not out.exists()  # stopped before the first step: nothing written
