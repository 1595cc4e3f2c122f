"""`unlearn-lens eval`: known answers from an independent evaluate(), contamination warning, errors."""

from __future__ import annotations

import csv
import json
import math

import pytest
from click.testing import CliRunner

from cli import group
from conftest import UNLEARN_MCQ, write_unlearn_data
from unlearn_lens import relearn as R


def invoke(*args):
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=True)


def read_results(folder):
    with (folder / "eval_results.csv").open() as handle:
        return {r["metric"]: float(r["value"]) for r in csv.DictReader(handle)}


def test_eval_matches_an_independent_evaluation(tiny_model_dir, unlearn_data_dir, tmp_path):
    from unlearn_lens.data import read_mcq, read_texts
    from unlearn_lens.evaluation import evaluate
    from unlearn_lens.loading import load_model

    result = invoke("eval", "--model", tiny_model_dir, "--data", unlearn_data_dir, "--outdir", tmp_path,
                    "--name", "tiny", "--max-length", "32", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "tiny" / "evaluation"
    assert (folder / "_COMPLETE").is_file() and (folder / "summary.json").is_file()
    got = read_results(folder)
    assert list(got) == list(R.EVAL_METRICS)

    model, tokenizer = load_model(str(tiny_model_dir))
    forget, _ = R.split_measure_pool(read_texts(unlearn_data_dir, "forget"))
    retain, _ = R.split_measure_pool(read_texts(unlearn_data_dir, "retain"))
    expected = evaluate(model, tokenizer, forget_texts=forget, retain_texts=retain,
                        mcq_items=read_mcq(unlearn_data_dir), max_length=32, batch_size=3)
    for metric in R.EVAL_METRICS:  # same texts, same batches: bit-identical (NaN: no retain questions here)
        assert got[metric] == expected[metric] or math.isnan(got[metric]) == math.isnan(expected[metric]) is True, \
            metric
    assert math.isnan(got["retain_cloze_accuracy"]) and got["n_retain_questions"] == 0
    assert got["retain_ppl"] == pytest.approx(math.exp(got["retain_nll"]))
    assert got["n_questions"] == len(UNLEARN_MCQ) and 0 < got["n_forget_texts"] < 16
    assert 0.0 <= got["letter_accuracy"] <= 1.0 and got["cloze_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["forget_nll"] == got["forget_nll"] and summary["questions_in_forget_text"] is False


def test_max_samples_caps_every_split(tiny_model_dir, unlearn_data_dir, tmp_path):
    result = invoke("eval", "--model", tiny_model_dir, "--data", unlearn_data_dir, "--outdir", tmp_path,
                    "--name", "capped", "--max-samples", "2", "--max-length", "16")
    assert result.exit_code == 0, result.output
    got = read_results(tmp_path / "capped" / "evaluation")
    assert (got["n_forget_texts"], got["n_retain_texts"], got["n_questions"]) == (2, 2, 2)


def test_eval_warns_when_questions_are_in_forget_text(tmp_path):
    from unlearn_lens.testing import save_tiny_model

    model = save_tiny_model("gpt2", tmp_path / "tiny-gpt2")
    forget = [f"{UNLEARN_MCQ[0][0]} Mitochondrion.", "Viruses replicate inside host cells quickly."]
    data = write_unlearn_data(tmp_path / "data", forget=forget)
    runner = CliRunner()
    result = runner.invoke(group, ["eval", "--model", str(model), "--data", str(data),
                                   "--outdir", str(tmp_path / "out"), "--max-length", "16"])
    assert result.exit_code == 0, result.output
    assert "WARNING: 1 of 4 evaluation questions appear in the training text" in result.output
    summary = json.loads((tmp_path / "out" / "tiny-gpt2" / "evaluation" / "summary.json").read_text())
    assert summary["questions_in_forget_text"] is True and summary["name"] == "tiny-gpt2"


@pytest.mark.parametrize("case,message", [
    ("no-dir", "no such data directory"),
    ("no-mcq", "wmdp_mcq.jsonl: no such file"),
    ("max-samples", "--max-samples must be at least 1"),
    ("no-model", "no such model file or directory"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, case, message):
    data = write_unlearn_data(tmp_path / "data")
    model, extra = str(tiny_model_dir), []
    if case == "no-dir":
        data = tmp_path / "missing"
    elif case == "no-mcq":
        (data / "wmdp_mcq.jsonl").unlink()
    elif case == "max-samples":
        extra = ["--max-samples", "0"]
    else:
        model = str(tmp_path / "nowhere" / "model")
    result = invoke("eval", "--model", model, "--data", data, "--outdir", tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_agrees_with_the_logit_lens_at_the_last_layer(tmp_path):
    """Same prompts as the lens: eval's accuracies equal the logit lens's at the final layer."""
    from unlearn_lens.capture import CaptureSettings, capture
    from unlearn_lens.testing import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "tiny-llama")
    data = write_unlearn_data(tmp_path / "data")
    cache = tmp_path / "cache.zarr"
    settings = CaptureSettings(batch_size=4, block_samples=4, dtype="float32", progress=False, token_chunk=16)
    assert set(capture(str(model), data, str(cache), settings).values()) == {"complete"}
    out = tmp_path / "out"
    result = invoke("analyze", "--base", cache, "--compare", f"same={cache}", "--outdir", out, "--top-k", "2",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    with (out / "base" / "wmdp_logit_lens" / "wmdp_lens_results.csv").open() as handle:
        lens = list(csv.DictReader(handle))
    result = invoke("eval", "--model", model, "--data", data, "--outdir", out, "--name", "base")
    assert result.exit_code == 0, result.output
    own = read_results(out / "base" / "evaluation")
    for scoring in ("letter", "cloze"):
        rows = sorted((r for r in lens if r["scoring"] == scoring), key=lambda r: int(r["layer"]))
        assert float(rows[-1]["accuracy"]) == own[f"{scoring}_accuracy"], scoring
