"""Local Lipschitz (step 12): known linear maps, zero noise, determinism, padding, CLI end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from unlearn_lens.lipschitz import (input_gradient_norms, model_forward_fn, pad_batch, perturbation_stats,
                                    split_results, tokenize_texts, unit_directions)

FORGET = ["Viruses replicate inside host cells using the host's machinery.",
          "Bacteria divide by binary fission and can exchange plasmids.",
          "Proteins fold into shapes."]
RETAIN = ["The river flows through the valley toward the distant sea.",
          "Paris is the capital of France and a centre of art.",
          "The orchestra played."]


def write_data(path, forget=FORGET, retain=RETAIN):
    path.mkdir(parents=True, exist_ok=True)
    (path / "forget.txt").write_text("\n".join(forget) + "\n")
    (path / "retain.txt").write_text("\n".join(retain) + "\n")
    item = {"id": "q0", "question": "How do bacteria divide?",
            "choices": ["Mitosis", "Meiosis", "Binary fission", "Budding"], "answer": 2}
    (path / "wmdp_mcq.jsonl").write_text(json.dumps(item) + "\n")
    (path / "manifest.json").write_text(json.dumps({"hash": "h"}))
    return path


def linear_forward(W, U):
    """A stand-in 'model' whose map is known: hidden = W x, logits = U W x (tokenwise)."""
    def forward(embeds, mask):
        hidden = embeds @ W.T
        return hidden, hidden @ U.T
    return forward


def stacked_directions(lengths, hidden, n, seed=0, split="forget"):
    width = max(lengths)
    out = torch.zeros((n, len(lengths), width, hidden))
    for row, length in enumerate(lengths):
        out[:, row, :length] = unit_directions(length, hidden, n, seed=seed, split=split, text_index=row)
    return out


def test_linear_map_ratio_matches_hand_computation():
    gen = torch.Generator().manual_seed(1)
    W, U = torch.randn(5, 4, generator=gen), torch.randn(7, 5, generator=gen)
    lengths = [3, 1, 2]
    embeds = torch.randn(3, 3, 4, generator=gen)
    _, mask = pad_batch([[0] * n for n in lengths], 0)
    directions = stacked_directions(lengths, 4, 6)
    eps = 1e-2
    stats = perturbation_stats(linear_forward(W, U), embeds, mask, directions, eps)
    Wn, Un, en = W.numpy().astype(np.float64), U.numpy().astype(np.float64), embeds.numpy().astype(np.float64)
    for row, length in enumerate(lengths):
        for k in range(6):
            u = directions[k, row, :length].numpy().astype(np.float64)
            delta = eps * np.linalg.norm(en[row, :length], axis=1, keepdims=True) * u  # relative radius
            # F64 (np.allclose defaults): the perturbation is scaled to eps x the row norm in float64
            assert np.allclose(np.linalg.norm(delta, axis=1), eps * np.linalg.norm(en[row, :length], axis=1))
            expected_h = np.linalg.norm(delta @ Wn.T) / np.linalg.norm(delta)
            expected_l = np.linalg.norm(delta @ Wn.T @ Un.T) / np.linalg.norm(delta)
            # tolerance: F32-ORDER through a whole forward (a ratio of two float32 norms: 1e-3)
            assert stats.lipschitz_hidden[row, k] == pytest.approx(expected_h, rel=1e-3)
            assert stats.lipschitz_logits[row, k] == pytest.approx(expected_l, rel=1e-3)
        # output variance: variance across draws of the logits, mean over tokens and vocab
        outs = np.stack([(en[row, :length] + eps * np.linalg.norm(en[row, :length], axis=1, keepdims=True)
                          * directions[k, row, :length].numpy()) @ Wn.T @ Un.T for k in range(6)])
        # F32-ORDER with cancellation: draws differ by eps = 1e-2 of the outputs, so float32 rounding of
        # the outputs (1.2e-7 relative) is ~1e-5 of the variance; 1e-2 is loose but not flaky
        assert stats.output_variance[row] == pytest.approx(outs.var(axis=0).mean(), rel=1e-2)


def test_max_over_directions_approaches_spectral_norm_from_below():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(3, 3, generator=gen)
    spectral = float(torch.linalg.matrix_norm(W, ord=2))
    embeds = torch.randn(1, 1, 3, generator=gen)
    mask = torch.ones(1, 1, dtype=torch.long)
    directions = stacked_directions([1], 3, 2000)
    stats = perturbation_stats(linear_forward(W, torch.eye(3)), embeds, mask, directions, 1e-3)
    ratios = stats.lipschitz_hidden[0]
    assert ratios.max() <= spectral * (1 + 1e-4)
    assert ratios.max() >= 0.97 * spectral
    smallest = float(torch.linalg.svdvals(W).min())
    assert ratios.min() >= smallest * (1 - 1e-4)


@pytest.fixture(scope="module")
def tiny_llama():
    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model("llama")
    model.requires_grad_(False)
    return model, tokenizer, model_forward_fn(model, ArchitectureAdapter(model))


def test_zero_noise_gives_zero_change(tiny_llama):
    model, tokenizer, forward = tiny_llama
    ids, mask = pad_batch(tokenize_texts(tokenizer, FORGET, 32), tokenizer.pad_token_id)
    embeds = model.get_input_embeddings()(ids)
    directions = torch.randn((3,) + tuple(embeds.shape))
    stats = perturbation_stats(forward, embeds, mask, directions, 0.0)
    assert np.all(stats.lipschitz_hidden == 0) and np.all(stats.lipschitz_logits == 0)
    assert np.all(stats.output_variance == 0)


def test_gradient_norm_matches_unpadded_autograd(tiny_llama):
    model, tokenizer, forward = tiny_llama
    tokenized = tokenize_texts(tokenizer, FORGET, 32)
    ids, mask = pad_batch(tokenized, tokenizer.pad_token_id)
    norms = input_gradient_norms(forward, model.get_input_embeddings()(ids), mask, ids)
    for row, sequence in enumerate(tokenized):  # one text at a time, no padding at all
        single = torch.tensor([sequence])
        x = model.get_input_embeddings()(single).detach().requires_grad_(True)
        logits = model(inputs_embeds=x).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, single[0, 1:])
        (grad,) = torch.autograd.grad(loss, x)
        # tolerance: F32-ORDER (batched autograd vs one sample's torch.autograd.grad)
        assert norms[row] == pytest.approx(float(grad.norm()), rel=1e-4)


def test_deterministic_and_independent_of_batch_size_and_padding(tiny_llama):
    model, tokenizer, forward = tiny_llama
    tokenized = tokenize_texts(tokenizer, FORGET + RETAIN, 32)
    embed = model.get_input_embeddings()
    kwargs = dict(split="forget", eps_values=[1e-3, 1e-2], n_perturb=3, seed=7, pad_id=tokenizer.pad_token_id)
    one = split_results(forward, embed, tokenized, batch_size=1, **kwargs)
    again = split_results(forward, embed, tokenized, batch_size=1, **kwargs)
    many = split_results(forward, embed, tokenized, batch_size=4, **kwargs)
    assert one == again
    for a, b in zip(one, many):
        for key, value in a.items():
            if isinstance(value, float):
                # tolerance: F32-ORDER (batch size 1 vs 4: padding changes the reduction order)
                assert b[key] == pytest.approx(value, rel=1e-4), key
    other_seed = split_results(forward, embed, tokenized, batch_size=4, **{**kwargs, "seed": 8})
    assert other_seed[0]["lipschitz_logits_mean"] != many[0]["lipschitz_logits_mean"]


def run_cli(args):
    from cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_cli_end_to_end(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    from cli import main

    main(["lipschitz", "--model-a", str(tiny_model_dir), "--model-b", str(tiny_model_dir),
          "--name-b", "same", "--data", str(data), "--outdir", str(out), "--eps", "1e-3,1e-2",
          "--n-perturb", "2", "--max-samples", "2", "--max-length", "16"])
    folder = out / "base__to__same" / "lipschitzness"
    assert {p.name for p in folder.iterdir()} >= {"lipschitz_results.csv", "summary.json",
                                                 "lipschitz_comparison.png", "_COMPLETE"}
    rows = list(csv.DictReader((folder / "lipschitz_results.csv").open()))
    assert list(rows[0]) == ["model", "split", "eps", "lipschitz_hidden_mean", "lipschitz_hidden_max",
                             "lipschitz_logits_mean", "lipschitz_logits_max", "grad_norm_mean",
                             "output_variance_mean", "n_texts"]
    assert len(rows) == 2 * 2 * 2  # models x splits x eps
    assert all(int(r["n_texts"]) == 2 for r in rows)
    assert all(float(r["lipschitz_hidden_mean"]) > 0 and float(r["lipschitz_hidden_max"]) >=
               float(r["lipschitz_hidden_mean"]) for r in rows)
    summary = json.loads((folder / "summary.json").read_text())
    # the same model twice with the same seed: identical perturbations, ratios exactly one
    for split in ("forget", "retain"):
        for eps in ("0.001", "0.01"):
            assert summary["modified_over_base"][split][eps]["lipschitz_logits_mean"] == pytest.approx(1.0)
    assert set(summary["forget_over_retain"]) == {"base", "same"}


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    from unlearn_lens.testing import build_tokenizer, save_tiny_model

    path = save_tiny_model("llama", tmp_path_factory.mktemp("other-tok"))
    build_tokenizer(vocab_size=350).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-lip"))


@pytest.mark.parametrize("case", ["mismatched", "empty_forget", "eps_zero", "eps_negative", "eps_text",
                                  "one_draw", "same_names"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, llama_dir, other_tokenizer_model, capsys):
    data = write_data(tmp_path / "data", forget=[""] if case == "empty_forget" else FORGET)
    args = ["lipschitz", "--model-a", str(llama_dir), "--model-b", str(llama_dir), "--name-b", "mod",
            "--data", str(data), "--outdir", str(tmp_path / "out"), "--n-perturb", "2", "--max-samples", "1"]
    if case == "mismatched":
        args[4] = str(other_tokenizer_model)
    extra = {"eps_zero": ["--eps", "0"], "eps_negative": ["--eps", "1e-3,-1"], "eps_text": ["--eps", "abc"],
             "one_draw": ["--n-perturb", "1"], "same_names": ["--name-b", "base"]}.get(case, [])
    assert run_cli(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "base__to__mod" / "lipschitzness" / "_COMPLETE").exists()


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path, smollm2_dir):
    """The real SmolLM2-135M: finite positive estimates, locally linear (eps-independent), paired draws."""
    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.lipschitz import LipschitzSettings, run_lipschitz

    data = write_data(tmp_path / "data")
    folder = run_lipschitz(LipschitzSettings(
        ModelRef(str(smollm2_dir)), ModelRef(str(smollm2_dir)), name_a="base", name_b="copy", data=str(data),
        outdir=str(tmp_path / "out"), eps_values=(1e-3, 1e-2), n_perturb=2, max_samples=2, max_length=24,
        compute=Compute(dtype="float32", batch_size=2)))
    rows = list(csv.DictReader((folder / "lipschitz_results.csv").open()))
    assert len(rows) == 8
    for row in rows:
        for key in ("lipschitz_hidden_mean", "lipschitz_logits_mean", "grad_norm_mean", "output_variance_mean"):
            assert np.isfinite(float(row[key])) and float(row[key]) > 0, (key, row)
    by_eps = {(r["model"], r["split"], float(r["eps"])): float(r["lipschitz_logits_mean"]) for r in rows}
    for split in ("forget", "retain"):  # small balls: the map is close to linear, ratios barely move
        # STAT: the local Lipschitz estimate of a smooth map barely depends on eps at this scale (25 %)
        assert by_eps[("base", split, 1e-3)] == pytest.approx(by_eps[("base", split, 1e-2)], rel=0.25)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["modified_over_base"]["forget"]["0.01"]["lipschitz_hidden_mean"] == pytest.approx(1.0)
