"""Tuned lens (step 14): identity at init = logit lens, training lowers KL, outputs, cache path, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from unlearn_lens.architectures import ArchitectureAdapter
from unlearn_lens.data import MCQItem
from unlearn_lens.prompts import cloze_context, cloze_continuations, letter_prompt, letter_token_ids
from unlearn_lens.tuned_lens import (cache_token_residuals, cloze_data_from_cache, cloze_data_from_model,
                                     kl_by_layer, lens_accuracies, lens_for_model, letter_data_from_cache,
                                     letter_data_from_model, load_translators, model_token_residuals,
                                     readout_parameters, run_tuned_lens, run_with_residuals, train_tuned_lens,
                                     TunedLensSettings)
from unlearn_lens.core.settings import Compute, ModelRef
from unlearn_lens.lipschitz import pad_batch, tokenize_texts

RETAIN = ["The river flows through the valley toward the distant sea.",
          "Paris is the capital of France and a centre of art and science.",
          "The orchestra played a symphony by Beethoven to a full hall.",
          "Mountains form where tectonic plates collide over millions of years."]
FORGET = ["Viruses replicate inside host cells using the host's machinery.",
          "Bacteria divide by binary fission and can exchange plasmids."]
MCQ = [
    ("Which organelle produces most of the cell's energy?", ["Nucleus", "Mitochondrion", "Ribosome", "Golgi"], 1),
    ("How do bacteria divide?", ["Mitosis", "Meiosis", "Binary fission", "Budding"], 2),
    ("What protects a virus genome?", ["Capsid", "Wall", "Membrane", "Nucleus"], 0),
    ("What do plasmids carry?", ["Lipids", "Sugars", "Water", "Genes"], 3),
    ("Where do viruses replicate?", ["In rivers", "Inside host cells", "In the sea", "In mountains"], 1),
    ("What determines a protein's function?", ["Its shape", "Its colour", "Its age", "Its name"], 0),
]
ITEMS = [MCQItem(f"q{i}", q, tuple(c), a) for i, (q, c, a) in enumerate(MCQ)]


def write_data(path, retain=RETAIN, mcq=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "forget.txt").write_text("\n".join(FORGET) + "\n")
    (path / "retain.txt").write_text("\n".join(retain) + "\n")
    if mcq:
        (path / "wmdp_mcq.jsonl").write_text("".join(
            json.dumps({"id": it.id, "question": it.question, "choices": list(it.choices), "answer": it.answer}) + "\n"
            for it in ITEMS))
    (path / "manifest.json").write_text(json.dumps({"hash": "h"}))
    return path


@pytest.fixture(scope="module", params=["gpt_neox", "llama", "gpt2"])
def tiny(request):
    from unlearn_lens.testing import make_tiny_model

    model, tokenizer = make_tiny_model(request.param)
    model.requires_grad_(False)
    return model, tokenizer, ArchitectureAdapter(model)


def test_hooked_residuals_equal_hf_hidden_states(tiny):
    model, tokenizer, adapter = tiny
    ids, mask = pad_batch(tokenize_texts(tokenizer, RETAIN, 32), tokenizer.pad_token_id)
    resid, logits = run_with_residuals(model, adapter, ids, mask)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert resid.shape[0] == adapter.num_layers + 1
    for layer in range(adapter.num_layers):  # HF's last entry is after the final norm
        torch.testing.assert_close(resid[layer], out.hidden_states[layer])
    lens = lens_for_model(model, adapter)
    # tolerance: F32-ORDER (the lens's float32 copy of norm + unembedding vs the model's own head)
    torch.testing.assert_close(lens(resid[-1], adapter.num_layers), out.logits, rtol=1e-5, atol=1e-5)


def test_lens_at_init_is_the_logit_lens(tiny):
    model, tokenizer, adapter = tiny
    ids, mask = pad_batch(tokenize_texts(tokenizer, RETAIN, 32), tokenizer.pad_token_id)
    resid, _ = run_with_residuals(model, adapter, ids, mask)
    lens = lens_for_model(model, adapter)
    for layer in range(adapter.num_layers + 1):
        expected = adapter.unembed()(adapter.final_norm()(resid[layer]))
        torch.testing.assert_close(lens(resid[layer], layer), expected)


def reference_logit_lens_accuracy(model, tokenizer, adapter, items):
    """Independent logit lens: one unpadded sequence at a time, HF hidden states, model's own logits last."""
    norm, unembed = adapter.final_norm(), adapter.unembed()
    letters = letter_token_ids(tokenizer)
    n_layers = adapter.num_layers + 1
    letter_correct, cloze_correct = np.zeros(n_layers), np.zeros(n_layers)
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([tokenizer(letter_prompt(item.question, item.choices),
                                          add_special_tokens=False)["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True)
            per_layer = [unembed(norm(h[0, -1])) for h in out.hidden_states[:-1]] + [out.logits[0, -1]]
            letter_correct += [int(lg[letters].argmax()) == item.answer for lg in per_layer]
            scores = np.zeros((n_layers, 4))
            context = tokenizer(cloze_context(item.question), add_special_tokens=False)["input_ids"]
            for c, continuation in enumerate(cloze_continuations(item.choices)):
                cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
                seq = torch.tensor([context + cont])
                out = model(input_ids=seq, output_hidden_states=True)
                positions = torch.arange(len(context) - 1, len(context) + len(cont) - 1)
                targets = seq[0, positions + 1]
                per_layer = [unembed(norm(h[0])) for h in out.hidden_states[:-1]] + [out.logits[0]]
                for layer, logits in enumerate(per_layer):
                    logp = torch.log_softmax(logits.float(), -1)[positions, targets]
                    scores[layer, c] = float(logp.mean())
            cloze_correct += scores.argmax(axis=1) == item.answer
    return letter_correct / len(items), cloze_correct / len(items)


def test_accuracies_at_init_equal_independent_logit_lens_and_model_answers(tiny):
    from unlearn_lens import evaluation

    model, tokenizer, adapter = tiny
    lens = lens_for_model(model, adapter)
    options = dict(max_length=128, batch_size=4, device="cpu")
    letter = letter_data_from_model(model, adapter, tokenizer, ITEMS, **options)
    cloze = cloze_data_from_model(model, adapter, tokenizer, ITEMS, **options)
    norm, unembedding = readout_parameters(adapter)
    rows = lens_accuracies(lens, letter, cloze, norm=norm, unembedding=unembedding)
    got = {s: np.array([r["accuracy"] for r in rows if r["scoring"] == s]) for s in ("letter", "cloze")}
    ref_letter, ref_cloze = reference_logit_lens_accuracy(model, tokenizer, adapter, ITEMS)
    # EXACT: the same translated states scored by the same code
    np.testing.assert_allclose(got["letter"], ref_letter)
    np.testing.assert_allclose(got["cloze"], ref_cloze)
    # the last layer is the model's own answer (helper-5's evaluation computes it from plain logits)
    assert got["letter"][-1] == pytest.approx(evaluation.letter_accuracy(model, tokenizer, ITEMS))
    assert got["cloze"][-1] == pytest.approx(evaluation.cloze_accuracy(model, tokenizer, ITEMS))
    assert all(r["delta_from_final"] == pytest.approx(r["accuracy"] - got[r["scoring"]][-1]) for r in rows)
    assert {r["n_questions"] for r in rows} == {len(ITEMS)}


def test_training_lowers_kl_and_keeps_last_layer_identity(tiny):
    model, tokenizer, adapter = tiny
    resid = model_token_residuals(model, adapter, tokenize_texts(tokenizer, RETAIN, 32),
                                  pad_id=tokenizer.pad_token_id, batch_size=2, device="cpu")
    lens = lens_for_model(model, adapter)
    before = kl_by_layer(lens, resid)
    log = train_tuned_lens(lens, resid, steps=25, lr=1e-2, tokens_per_step=64, seed=0)
    after = kl_by_layer(lens, resid)
    assert len(log) == 25
    # F32-ORDER: the last layer's KL to itself is zero up to float32 log-softmax rounding
    assert before[-1] == pytest.approx(0.0, abs=1e-6) and after[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(after[:-1] < before[:-1]), (before, after)
    arrays = lens.translator_arrays()
    L = adapter.num_layers
    assert arrays["weight"].shape == (L + 1, lens.hidden_size, lens.hidden_size)
    assert not arrays["weight"][-1].any() and not arrays["bias"][-1].any()
    assert np.abs(arrays["weight"][:-1]).max() > 0
    h = resid[:, :5]
    torch.testing.assert_close(lens.translate(h[L], L), h[L])  # identity, whatever was trained


def test_training_is_deterministic_for_a_seed(tiny):
    model, tokenizer, adapter = tiny
    resid = model_token_residuals(model, adapter, tokenize_texts(tokenizer, RETAIN[:2], 16),
                                  pad_id=tokenizer.pad_token_id, batch_size=2, device="cpu")
    runs = []
    for _ in range(2):
        lens = lens_for_model(model, adapter)
        train_tuned_lens(lens, resid, steps=3, lr=1e-2, tokens_per_step=8, seed=3)
        runs.append(lens.translator_arrays()["weight"])
    np.testing.assert_array_equal(runs[0], runs[1])


# --- the cache path: a Dataset that follows cache_store/SCHEMA.md --------------------------------

def schema_datasets(model, tokenizer, adapter, dtype=np.float16):
    """Per-split xarray Datasets laid out as SCHEMA.md says, built from an independent HF forward."""
    import xarray as xr

    from unlearn_lens.tuned_lens import cloze_sequences

    def flat(sequences):
        resid, ids, offsets, lengths, last = [], [], [], [], []
        offset = 0
        for seq in sequences:
            grabbed = []  # the last block's output, before the final norm (HF's last entry is after it)
            handle = adapter.block(adapter.num_layers - 1).register_forward_hook(
                lambda _m, _a, output: grabbed.append(output[0] if isinstance(output, tuple) else output))
            out = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
            handle.remove()
            hs = torch.stack(list(out.hidden_states[:-1]) + grabbed)[:, 0]  # (L+1, T, d)
            resid.append(hs.numpy().astype(dtype))
            last.append(hs[:, -1].numpy())
            ids += seq
            offsets.append(offset)
            lengths.append(len(seq))
            offset += len(seq)
        n = offset
        return {
            "resid": (("layer", "token", "hidden"), np.concatenate(resid, axis=1)),
            "last": (("layer", "sample", "hidden"), np.stack(last, axis=1)),
            "input_ids": (("token",), np.array(ids, np.int32)),
            "attention_mask": (("token",), np.ones(n, np.int8)),
            "sample_offset": (("sample",), np.array(offsets, np.int64)),
            "sample_length": (("sample",), np.array(lengths, np.int32)),
        }

    attrs = {"num_layers": adapter.num_layers, "hidden_size": model.config.hidden_size, "complete": True}
    with torch.no_grad():
        retain = xr.Dataset(flat(tokenize_texts(tokenizer, RETAIN, 32)), attrs={**attrs, "split": "retain"})
        letters = [tokenizer(letter_prompt(i.question, i.choices), add_special_tokens=False)["input_ids"]
                   for i in ITEMS]
        wmdp = xr.Dataset({**flat(letters), "answer": (("sample",), np.array([i.answer for i in ITEMS], np.int8)),
                           "letter_token_ids": (("choice",), np.array(letter_token_ids(tokenizer), np.int32))},
                          attrs={**attrs, "split": "wmdp"})
        sequences = cloze_sequences(tokenizer, ITEMS, 128)
        cloze = xr.Dataset({**flat([s[0] for s in sequences]),
                            "question": (("sample",), np.array([s[3] for s in sequences], np.int32)),
                            "choice_index": (("sample",), np.array([s[4] for s in sequences], np.int8)),
                            "cont_start": (("sample",), np.array([s[1] for s in sequences], np.int32)),
                            "cont_end": (("sample",), np.array([s[2] for s in sequences], np.int32))},
                           attrs={**attrs, "split": "wmdp_cloze"})
    return {"retain": retain.chunk({"token": 7}), "wmdp": wmdp, "wmdp_cloze": cloze.chunk({"token": 5})}


def test_cache_readers_match_the_model_path(tiny):
    model, tokenizer, adapter = tiny
    splits = schema_datasets(model, tokenizer, adapter)
    from_cache = cache_token_residuals(splits["retain"], None)
    from_model = model_token_residuals(model, adapter, tokenize_texts(tokenizer, RETAIN, 32),
                                       pad_id=tokenizer.pad_token_id, batch_size=3, device="cpu")
    assert from_cache.dtype == torch.float16  # kept as stored, cast per minibatch
    # tolerance: F16-STORE (the synthetic cache stores float16)
    torch.testing.assert_close(from_cache.float(), from_model, rtol=2e-3, atol=2e-3)
    assert cache_token_residuals(splits["retain"], 1).shape[1] == len(tokenize_texts(tokenizer, RETAIN[:1], 32)[0])
    short = cache_token_residuals(splits["retain"], None, 5)  # each sample cut to its first 5 tokens
    torch.testing.assert_close(short.float(), model_token_residuals(
        model, adapter, tokenize_texts(tokenizer, RETAIN, 5), pad_id=tokenizer.pad_token_id, batch_size=3,
        device="cpu"), rtol=2e-3, atol=2e-3)
    letter_c = letter_data_from_cache(splits["wmdp"])
    letter_m = letter_data_from_model(model, adapter, tokenizer, ITEMS, max_length=128, batch_size=4, device="cpu")
    # tolerance: F32-ORDER (float32 letter states, batched differently)
    torch.testing.assert_close(letter_c.last, letter_m.last, rtol=1e-4, atol=1e-4)
    assert letter_c.letter_ids == letter_m.letter_ids
    cloze_c = cloze_data_from_cache(splits["wmdp_cloze"], letter_c.answers)
    cloze_m = cloze_data_from_model(model, adapter, tokenizer, ITEMS, max_length=128, batch_size=4, device="cpu")
    np.testing.assert_array_equal(cloze_c.targets, cloze_m.targets)
    np.testing.assert_array_equal(cloze_c.position_sequence, cloze_m.position_sequence)
    # tolerance: F16-STORE
    torch.testing.assert_close(cloze_c.states, cloze_m.states, rtol=2e-3, atol=2e-3)


def test_run_from_cache_equals_run_from_model(tmp_path, monkeypatch):
    import cache_store
    from unlearn_lens.testing import make_tiny_model, save_tiny_model

    model_dir = save_tiny_model("llama", tmp_path / "model")
    model, tokenizer = make_tiny_model("llama")
    splits = schema_datasets(model, tokenizer, ArchitectureAdapter(model), dtype=np.float32)
    data = write_data(tmp_path / "data")
    options = dict(data=str(data), outdir=str(tmp_path / "out"), steps=3, lr=1e-2, tokens_per_step=16,
                   max_length=32, compute=Compute(batch_size=2))
    plain = run_tuned_lens(TunedLensSettings(ModelRef(str(model_dir)), name="plain", **options))
    monkeypatch.setattr(cache_store, "list_splits", lambda url: sorted(splits))
    monkeypatch.setattr(cache_store, "is_complete", lambda url, split=None: True)
    monkeypatch.setattr(cache_store, "open_cache", lambda url, split: splits[split])
    cached = run_tuned_lens(TunedLensSettings(ModelRef(str(model_dir)), name="cached", cache="fake://cache", **options))
    config = json.loads((cached / "config.json").read_text())
    assert config["sources"] == {"train": "cache fake://cache", "wmdp": "cache fake://cache"}
    a = load_translators(plain / "translators.safetensors")
    b = load_translators(cached / "translators.safetensors")
    # the inputs agree to float32 rounding (test above); Adam can turn that into up to ~lr per step
    # where a gradient is near zero, so the bound is Adam's drift, not a fixed atol. Accuracies after
    # training are argmaxes of those weights (a near-tie may flip); their inputs are compared in
    # test_cache_readers_match_the_model_path.
    for key in ("weight", "bias"):
        assert float(np.abs(a[key] - b[key]).max()) <= 2 * adam_drift_bound(3, 1e-2)
    rows_a = list(csv.DictReader((plain / "wmdp_lens_results.csv").open()))
    rows_b = list(csv.DictReader((cached / "wmdp_lens_results.csv").open()))
    assert [(r["layer"], r["scoring"]) for r in rows_a] == [(r["layer"], r["scoring"]) for r in rows_b]


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_end_to_end(tmp_path, tiny_model_dir):
    from cli import main

    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    main(["tuned-lens", "--model", str(tiny_model_dir), "--name", "tiny", "--data", str(data),
          "--outdir", str(out), "--steps", "3", "--tokens-per-step", "32", "--max-length", "32"])
    folder = out / "tiny" / "wmdp_tuned_lens"
    assert {p.name for p in folder.iterdir()} >= {
        "translators.safetensors", "config.json", "wmdp_lens_results.csv", "summary.json", "wmdp_tuned_lens.png",
        "training_kl.csv", "train_log.csv", "_COMPLETE"}
    config = json.loads((folder / "config.json").read_text())
    assert config["kl_measured_on"] == "the first 64 training tokens"  # two steps of 32 (kl_report_tokens)
    L = config["num_layers"]
    rows = list(csv.DictReader((folder / "wmdp_lens_results.csv").open()))
    assert list(rows[0]) == ["layer", "scoring", "accuracy", "delta_from_final", "n_questions"]
    assert len(rows) == 2 * (L + 1) and {r["scoring"] for r in rows} == {"letter", "cloze"}
    arrays = load_translators(folder / "translators.safetensors")  # numpy only
    assert arrays["weight"].dtype == np.float32 and arrays["weight"].shape[0] == L + 1
    assert not arrays["weight"][-1].any() and not arrays["bias"][-1].any()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["chance"] == 0.25 and summary["n_questions"] == len(ITEMS)
    assert summary["letter"]["final_layer_accuracy"] == float(rows[L]["accuracy"])
    # a finished folder is kept: the same command again returns at once and changes nothing
    stamp = (folder / "translators.safetensors").stat().st_mtime_ns
    main(["tuned-lens", "--model", str(tiny_model_dir), "--name", "tiny", "--data", str(data),
          "--outdir", str(out), "--steps", "3", "--tokens-per-step", "32", "--max-length", "32"])
    assert (folder / "translators.safetensors").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-tl"))


@pytest.mark.parametrize("case", ["steps_negative", "lr_zero", "empty_retain", "no_mcq", "bad_cache"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, llama_dir, capsys):
    from cli import main

    data = write_data(tmp_path / "data", retain=["", " "] if case == "empty_retain" else RETAIN,
                      mcq=case != "no_mcq")
    args = ["tuned-lens", "--model", str(llama_dir), "--name", "m", "--data", str(data),
            "--outdir", str(tmp_path / "out"), "--steps", "1"]
    args += {"steps_negative": ["--steps", "-1"], "lr_zero": ["--lr", "0"],
             "bad_cache": ["--cache", str(tmp_path / "no-such-cache")]}.get(case, [])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may come first
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out" / "m" / "wmdp_tuned_lens" / "_COMPLETE").exists()


def test_cache_of_another_architecture_is_refused(tmp_path, llama_dir, monkeypatch, capsys):
    import xarray as xr

    import cache_store
    from cli import main

    other = xr.Dataset(attrs={"num_layers": 99, "hidden_size": 7, "complete": True})
    monkeypatch.setattr(cache_store, "list_splits", lambda url: ["retain"])
    monkeypatch.setattr(cache_store, "is_complete", lambda url, split=None: True)
    monkeypatch.setattr(cache_store, "open_cache", lambda url, split: other)
    data = write_data(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        main(["tuned-lens", "--model", str(llama_dir), "--name", "m", "--data", str(data),
              "--outdir", str(tmp_path / "out"), "--cache", "fake://c"])
    assert exit_info.value.code == 2
    assert "99 layers" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_smollm2_training_lowers_kl_and_last_layer_is_the_model(tmp_path, smollm2_dir):
    """The real SmolLM2-135M: a few steps lower every layer's KL; the last layer answers as the model."""
    from unlearn_lens import evaluation
    from unlearn_lens.loading import load_model

    data = write_data(tmp_path / "data")
    folder = run_tuned_lens(TunedLensSettings(ModelRef(str(smollm2_dir)), name="smollm2", data=str(data),
                                              outdir=str(tmp_path / "out"), steps=5, lr=2e-3, tokens_per_step=32,
                                              max_length=32, compute=Compute(batch_size=4)))
    kl = list(csv.DictReader((folder / "training_kl.csv").open()))
    initial = np.array([float(r["kl_initial"]) for r in kl])
    final = np.array([float(r["kl_final"]) for r in kl])
    # F32-ORDER on a 30-layer model: the last layer's KL to itself, float32 log-softmax rounding
    assert final[-1] == pytest.approx(0.0, abs=1e-5)
    assert final[:-1].mean() < 0.9 * initial[:-1].mean()
    assert initial[:-1].mean() > 0.1  # a real model's early layers are far from its output
    rows = list(csv.DictReader((folder / "wmdp_lens_results.csv").open()))
    last = {r["scoring"]: float(r["accuracy"]) for r in rows if int(r["layer"]) == len(kl) - 1}
    model, tokenizer = load_model(str(smollm2_dir), dtype="float32")
    assert last["letter"] == pytest.approx(evaluation.letter_accuracy(model, tokenizer, ITEMS))
    assert last["cloze"] == pytest.approx(evaluation.cloze_accuracy(model, tokenizer, ITEMS))


# --- with a real capture (helper-3's `unlearn-lens capture`) --------------------------------------

def capture_cache(model_dir, data, path):
    from unlearn_lens.capture import CaptureSettings, capture

    capture(str(model_dir), str(data), str(path), CaptureSettings(max_length=32, dtype="float32", progress=False))
    return path


def adam_drift_bound(steps: int, lr: float, betas=(0.9, 0.999)) -> float:
    """Largest per-element distance Adam (bias-corrected, eps ignored) can move a weight in ``steps``
    steps: by Cauchy-Schwarz, |m_hat/sqrt(v_hat)| at step t is at most
    (1-b1)/(1-b1^t) * sqrt((1-b2^t)/(1-b2)) * sqrt(sum_j<t (b1^2/b2)^j), whatever the gradients."""
    b1, b2 = betas
    return lr * sum((1 - b1) / (1 - b1 ** t) * ((1 - b2 ** t) / (1 - b2)) ** 0.5
                    * sum((b1 * b1 / b2) ** j for j in range(t)) ** 0.5 for t in range(1, steps + 1))


def test_adam_drift_bound_holds_for_adversarial_gradients():
    """The bound is what torch's Adam reaches with constant-sign gradients (step 1 moves exactly lr)."""
    weight = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=1e-2)
    for gradient in ([1.0, -1e-3, 5.0], [1.0, -1e3, 1e-4], [1.0, -1e-3, 1e-9]):
        weight.grad = torch.tensor(gradient)
        optimizer.step()
    assert float(weight.detach().abs().max()) <= adam_drift_bound(3, 1e-2) * (1 + 1e-6)
    assert adam_drift_bound(1, 1e-2) == pytest.approx(1e-2)


def test_real_cache_gives_the_same_lens_as_the_model(tmp_path, tiny_model_dir):
    """The two paths differ only in where the training residuals come from. So: the residuals agree
    to float32 rounding; given its residuals, each path's lens is exactly what `train_tuned_lens` makes
    of them; and the two lenses are within the distance Adam can move weights in that many steps.

    (Comparing the weights with a fixed atol is not justified: batched and unbatched float32 forwards
    differ in the last bits, and Adam, which divides by sqrt(v), turns that into a change of up to
    about lr per step where a gradient is near zero: 1.5e-5 seen on another machine.)
    """
    from unlearn_lens.loading import load_model
    from unlearn_lens.tuned_lens import lens_for_model, model_token_residuals, open_cache_splits, train_tuned_lens

    data = write_data(tmp_path / "data")
    cache = capture_cache(tiny_model_dir, data, tmp_path / "cache")
    steps, lr, tokens = 3, 1e-2, 16
    options = dict(data=str(data), outdir=str(tmp_path / "out"), steps=steps, lr=lr, tokens_per_step=tokens,
                   max_length=32, compute=Compute(batch_size=2))
    plain = run_tuned_lens(TunedLensSettings(ModelRef(str(tiny_model_dir)), name="plain", **options))
    cached = run_tuned_lens(TunedLensSettings(ModelRef(str(tiny_model_dir)), name="cached", cache=str(cache),
                                              **options))
    assert json.loads((cached / "config.json").read_text())["sources"]["train"].startswith("cache")

    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32")
    adapter = ArchitectureAdapter(model)
    texts = (data / "retain.txt").read_text().splitlines()
    tokenized = [ids for ids in tokenize_texts(tokenizer, [t for t in texts if t.strip()], 32) if ids]
    with torch.no_grad():
        from_model = model_token_residuals(model, adapter, tokenized, pad_id=tokenizer.pad_token_id,
                                           batch_size=2, device="cpu")
    from_cache = cache_token_residuals(open_cache_splits(str(cache))["retain"], 256, 32)
    # the same tokens; float32 forwards of the same weights batched differently: the values agree to
    # float32 rounding accumulated over a few tiny layers (1e-5 of the largest value: ~100 ulp)
    assert from_model.shape == from_cache.shape
    scale = float(from_model.abs().max())
    assert float((from_model.float() - from_cache.float()).abs().max()) <= 1e-5 * scale

    def trained(resid):
        lens = lens_for_model(model, adapter)
        train_tuned_lens(lens, resid, steps=steps, lr=lr, tokens_per_step=tokens, seed=0)
        return lens.translator_arrays()

    for folder, resid in ((plain, from_model), (cached, from_cache)):  # after the inputs: bit for bit
        saved, again = load_translators(folder / "translators.safetensors"), trained(resid)
        for key in ("weight", "bias"):
            np.testing.assert_array_equal(saved[key], again[key])
    a = load_translators(plain / "translators.safetensors")
    b = load_translators(cached / "translators.safetensors")
    bound = 2 * adam_drift_bound(steps, lr)  # each lens moved at most this far from the same start
    for key in ("weight", "bias"):
        assert float(np.abs(a[key] - b[key]).max()) <= bound
    rows_a = list(csv.DictReader((plain / "wmdp_lens_results.csv").open()))
    rows_b = list(csv.DictReader((cached / "wmdp_lens_results.csv").open()))
    assert [(r["layer"], r["scoring"]) for r in rows_a] == [(r["layer"], r["scoring"]) for r in rows_b]


def test_untrained_tuned_lens_reproduces_the_analyze_logit_lens(tmp_path):
    """steps=0 (identity translators) through the cache equals helper-4's `analyze` logit lens."""
    from cli import main
    from unlearn_lens.testing import save_tiny_model

    model_dir = save_tiny_model("gpt_neox", tmp_path / "model")
    data = write_data(tmp_path / "data")
    cache = capture_cache(model_dir, data, tmp_path / "cache")
    main(["analyze", "--base", str(cache), "--compare", f"same={cache}", "--outdir", str(tmp_path / "an"),
          "--no-progress"])
    main(["tuned-lens", "--model", str(model_dir), "--name", "base", "--data", str(data), "--outdir",
          str(tmp_path / "tl"), "--steps", "0", "--cache", str(cache)])
    logit = list(csv.DictReader((tmp_path / "an" / "base" / "wmdp_logit_lens" / "wmdp_lens_results.csv").open()))
    tuned = list(csv.DictReader((tmp_path / "tl" / "base" / "wmdp_tuned_lens" / "wmdp_lens_results.csv").open()))
    key = lambda r: (r["scoring"], int(r["layer"]))  # noqa: E731
    assert {key(r): float(r["accuracy"]) for r in logit} == {key(r): float(r["accuracy"]) for r in tuned}


def test_kl_report_tokens_are_two_steps_at_most_1024():
    """The before / after KL reads two training steps' tokens: 1024 at the default 512 per step, as before."""
    from unlearn_lens.tuned_lens.step import kl_report_tokens

    assert [kl_report_tokens(n) for n in (16, 128, 512, 4096)] == [32, 256, 1024, 1024]
