"""`unlearn-lens infer`: generation matches HF generate; sweep CSVs are keyed by the prompt hash."""

from __future__ import annotations

import csv
import hashlib

import torch
from click.testing import CliRunner

from cli import group
from unlearn_lens.inference import GenerationSettings, generate
from unlearn_lens.loading import load_model


def test_greedy_generation_equals_hf_generate(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    prompt = "The cell membrane"
    text = generate(model, tokenizer, prompt, GenerationSettings(max_new_tokens=6, greedy=True))
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_sampling_reproduces_for_a_seed(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    settings = GenerationSettings(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=7)
    assert generate(model, tokenizer, "Paris is", settings) == generate(model, tokenizer, "Paris is", settings)


def test_sweep_writes_csv_named_by_prompt_hash(tmp_path, tiny_model_dir):
    prompt = "What is biotin?"
    result = CliRunner().invoke(group, ["infer", "--sweep", "--models", str(tiny_model_dir), "--prompt", prompt,
                                        "--greedy", "--max-new-tokens", "4", "--outdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    path = tmp_path / "inference" / f"{hashlib.sha256(prompt.encode()).hexdigest()}.csv"
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["prompt", "model", "model_path", "output"]
    assert rows[0]["prompt"] == prompt and rows[0]["model_path"] == str(tiny_model_dir)


def test_side_by_side_and_interactive(tiny_model_dir):
    runner = CliRunner()
    both = runner.invoke(group, ["infer", "--model", str(tiny_model_dir), "--model-b", str(tiny_model_dir),
                                 "--prompt", "Hello", "--greedy", "--max-new-tokens", "3"])
    assert both.exit_code == 0 and both.output.count("===") == 4
    chat = runner.invoke(group, ["infer", "--model", str(tiny_model_dir), "--interactive", "--greedy",
                                 "--max-new-tokens", "2"], input="first\nsecond\n\n")
    assert chat.exit_code == 0 and chat.output.count("prompt>") == 3


def test_bad_flags_fail_before_loading(tmp_path):
    from cli import main
    import pytest

    for args in (["infer", "--sweep", "--prompt", "x"], ["infer", "--model", "m"],
                 ["infer", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
