"""`unlearn-lens attack` and direction ablation: known answers on tiny models, invariants, errors.

The known answer: the modified model is the tiny GPT-NeoX base with a fixed vector v added to one
block's output (through the bias of its MLP output projection). Every token's residual after that
block then differs by exactly v, so the cache's mean difference there is v, and removing v's
direction from both models makes them compute the same function downstream.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import group
from conftest import UNLEARN_MCQ, write_unlearn_data
from test_analyze_runner import blocked_env

BLOCK = 1  # 0-based block whose output gets v
LAYER = BLOCK + 1  # the cache's residual layer after that block
FAMILY = "gpt_neox"
ANSWERS = (3, 3, 2, 0)


def plant_bias(source: Path, target: Path, v: np.ndarray) -> Path:
    """Copy a tiny GPT-NeoX directory, adding ``v`` to block ``BLOCK``'s MLP output bias."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    name = f"gpt_neox.layers.{BLOCK}.mlp.dense_4h_to_h.bias"
    tensors[name] = (tensors[name] + v).astype(tensors[name].dtype)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def capture_forget(model: Path, data: Path, out: Path, max_length: int = 64) -> Path:
    from unlearn_lens.capture import CaptureSettings, capture

    settings = CaptureSettings(splits=("forget",), batch_size=4, block_samples=4, dtype="float32",
                               progress=False, token_chunk=16, max_length=max_length)
    assert set(capture(str(model), data, str(out), settings).values()) == {"complete"}
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("attack")
    base = save_tiny_model(FAMILY, root / "base")
    v = np.random.default_rng(4).normal(size=32).astype(np.float32)
    v *= 8.0 / np.linalg.norm(v)
    modified = plant_bias(base, root / "modified", v)
    data = write_unlearn_data(root / "data")
    # answer keys chosen so that the planted change moves both accuracies of these random-init models
    # (base: letter 0.5, cloze 0.5; modified: 0.25, 0.0), so every recovery below has a denominator
    records = [{"id": f"q{i}", "question": q, "choices": c, "answer": a}
               for i, ((q, c, _), a) in enumerate(zip(UNLEARN_MCQ, ANSWERS))]
    (data / "wmdp_mcq.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    caches = {"base": capture_forget(base, data, root / "caches" / "base.zarr"),
              "unl": capture_forget(modified, data, root / "caches" / "unl.zarr")}
    return {"root": root, "base": base, "modified": modified, "v": v, "data": data, "caches": caches}


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path) as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


# --- directions from the caches ---------------------------------------------------------------

def test_directions_known_answer(planted, tmp_path):
    from analyses.activations.attack_directions import compute_and_save, load_directions

    path = compute_and_save(planted["caches"]["base"], planted["caches"]["unl"], tmp_path, kmax=4,
                            base_spec=str(planted["base"]), model_spec=str(planted["modified"]))
    d = load_directions(path)
    assert d["mean_diff"].shape == (4, 32) and d["pcs"].shape == (4, 4, 32) and d["pc_variance"].shape == (4, 4)
    v = planted["v"].astype(np.float64)
    mean = d["mean_diff"][LAYER].astype(np.float64)
    # float32 caches: the per-token difference is v up to float32 rounding of O(1) residuals (~1e-6)
    assert mean @ v / (np.linalg.norm(mean) * np.linalg.norm(v)) > 0.999
    assert np.allclose(mean, v, atol=1e-4)
    assert not d["mean_diff"][:LAYER].any()  # blocks before the change see identical inputs: exactly 0
    # a constant shift is the first uncentred principal direction, holding all the second moment
    assert abs(d["pcs"][LAYER, 0].astype(np.float64) @ v / np.linalg.norm(v)) > 0.999
    _, rows = read_csv(tmp_path / "directions.csv")
    by = {(int(r["layer"]), r["direction"]): r for r in rows}
    assert float(by[(LAYER, "pc1")]["variance_share"]) > 0.999
    # the only changed writing parameter is that bias: its span is v's line
    assert float(by[(LAYER, "mean_diff")]["write_space_share"]) == pytest.approx(1.0, abs=1e-6)
    assert float(by[(LAYER + 1, "mean_diff")]["write_space_share"]) == 0.0  # block 2 did not change
    assert math.isnan(float(by[(0, "mean_diff")]["write_space_share"]))  # zero direction


def test_chosen_layer_is_the_first_downstream_of_the_plant(planted, tmp_path):
    """Ranked relative to the base residual's RMS, the layer right after the planted block wins; the
    raw norm picks the last layer (the residual grows, and v travels on). Position 0 is not fitted."""
    from analyses.activations.attack_directions import compute_and_save, fit_mask, load_directions
    from cache_store import open_caches
    from unlearn_lens.attacks.ablation import chosen_layer, default_layers

    d = load_directions(compute_and_save(planted["caches"]["base"], planted["caches"]["unl"], tmp_path))
    assert chosen_layer(d) == LAYER
    raw = np.linalg.norm(d["mean_diff"].astype(np.float64), axis=1)
    assert int(np.argmax(raw)) == LAYER + 1  # what the raw rule chose
    assert max(default_layers(d, top=1, spread=0)) == LAYER
    ds = open_caches({"base": str(planted["caches"]["base"]), "modified": str(planted["caches"]["unl"])}, "forget")
    position = ds["token_position"].values
    fitted = fit_mask(ds, None, 1) & ~np.isin(ds["input_ids"].values, d["outlier_ids"])
    assert int(d["skip_positions"]) == 1 and not fitted[position == 0].any()
    assert int(d["n_tokens"]) == int(fitted.sum()) <= int(d["n_tokens_total"]) - ds.sizes["sample"]
    assert np.allclose(d["mean_diff"][LAYER], planted["v"], atol=1e-4)


def _stacked(base, modified):
    import xarray as xr

    from cache_store.reader import SHARED_VARIABLES

    shared = [v for v in SHARED_VARIABLES if v in base.variables]
    stacked = xr.concat([base.drop_vars(shared), modified.drop_vars(shared)], dim="model", coords="minimal",
                        compat="override", join="exact").assign_coords(model=["base", "modified"])
    for name in shared:
        stacked[name] = base[name]
    return stacked


def test_position_zero_and_unlisted_samples_are_not_fitted():
    """A synthetic pair: every token moved by v, position 0 (the sink) by 100 u besides. Fitted
    from position 1 the mean difference is v exactly; from position 0 it is pulled towards u."""
    from analyses.activations.attack_directions import directions_from_moments, moments_of
    from analyses.testing import make_cache, random_lengths

    rng = np.random.default_rng(0)
    lengths = random_lengths(12, rng)
    base = rng.normal(size=(3, int(lengths.sum()), 8))
    v, u = np.eye(8)[0] * 0.5, np.eye(8)[1]
    modified = base + v
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    modified[:, starts] += 100 * u
    ids = rng.integers(3, 50, size=int(lengths.sum()))
    ds = _stacked(make_cache(base, lengths, input_ids=ids, dtype=np.float64),
                  make_cache(modified, lengths, input_ids=ids, dtype=np.float64))
    fitted = directions_from_moments(moments_of(ds, skip=1, drop_outliers=False))
    assert np.allclose(fitted["mean_diff"][1], v, atol=1e-6) and int(fitted["n_tokens"]) == lengths.sum() - 12
    with_sink = directions_from_moments(moments_of(ds, skip=0, drop_outliers=False))
    mean = with_sink["mean_diff"][1]
    assert mean @ u / np.linalg.norm(mean) > 0.9  # the sink would have dominated
    chosen = directions_from_moments(moments_of(ds, samples=[2, 5], skip=1, drop_outliers=False))
    assert int(chosen["n_tokens"]) == lengths[2] + lengths[5] - 2
    keep = np.zeros(int(lengths.sum()), dtype=bool)
    for i in (2, 5):
        keep[starts[i] + 1:starts[i] + lengths[i]] = True
    rms = np.sqrt((base[2, keep] ** 2).sum(axis=1).mean())
    assert chosen["base_rms"][2] == pytest.approx(rms, rel=1e-6)
    assert chosen["relative_norm"][2] == pytest.approx(0.5 / rms, rel=1e-6)
    assert chosen["fit_samples"].tolist() == [2, 5]


def test_directions_without_checkpoints_are_nan(planted, tmp_path):
    from analyses.activations.attack_directions import compute_and_save

    compute_and_save(planted["caches"]["base"], planted["caches"]["unl"], tmp_path, kmax=2)
    _, rows = read_csv(tmp_path / "directions.csv")
    assert rows and all(math.isnan(float(r["write_space_share"])) for r in rows)
    assert {r["direction"] for r in rows} == {"mean_diff", "pc1", "pc2"}


def test_directions_with_torch_blocked(planted, tmp_path):
    script = textwrap.dedent(f'''
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not work")
        import analyses.attack_plots, analyses.recovery  # noqa: F401  (torch-free too)
        from analyses.activations.attack_directions import compute_and_save, load_directions
        path = compute_and_save({str(planted["caches"]["base"])!r}, {str(planted["caches"]["unl"])!r},
                                {str(tmp_path)!r}, base_spec={str(planted["base"])!r},
                                model_spec={str(planted["modified"])!r})
        assert load_directions(path)["mean_diff"].shape == (4, 32)
        bad = [m for m in ("torch", "transformers", "nnsight") if m in sys.modules]
        assert not bad, bad
        print("OK")
    ''')
    result = subprocess.run([sys.executable, "-c", script], env=blocked_env(tmp_path), capture_output=True,
                            text=True, timeout=300, cwd=str(Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


@pytest.mark.parametrize("family, name", [("llama", "model.layers.1.self_attn.o_proj.weight"),
                                          ("gpt2", "transformer.h.1.attn.c_proj.weight")])
def test_write_space_of_a_rank_one_change(tmp_path, family, name):
    """dW = u w^T in (out, in) orientation (GPT-2 stores Conv1D as (in, out)): its column space is u."""
    from safetensors.numpy import load_file, save_file

    from analyses.activations.attack_directions import share_in, write_space_projectors
    from unlearn_lens.testing import save_tiny_model

    base = save_tiny_model(family, tmp_path / "base")
    shutil.copytree(base, tmp_path / "modified")
    tensors = load_file(str(tmp_path / "modified" / "model.safetensors"))
    rng = np.random.default_rng(0)
    u, w = rng.normal(size=32), rng.normal(size=tensors[name].shape[1 if family == "llama" else 0])
    update = np.outer(u, w) if family == "llama" else np.outer(w, u)
    tensors[name] = (tensors[name] + 0.1 * update).astype(np.float32)
    save_file(tensors, str(tmp_path / "modified" / "model.safetensors"), metadata={"format": "pt"})
    projectors = write_space_projectors(str(base), str(tmp_path / "modified"), 3, 32)
    assert share_in(projectors[2], u) == pytest.approx(1.0, abs=1e-6)  # block 1 writes residual layer 2
    other = rng.normal(size=32)
    other -= (other @ u) / (u @ u) * u
    assert share_in(projectors[2], other) == pytest.approx(0.0, abs=1e-6)
    assert all(not p.any() for i, p in enumerate(projectors) if i != 2)  # nothing else changed


def test_mismatched_caches_are_refused(planted, tmp_path):
    from analyses.activations.attack_directions import compute_and_save
    from unlearn_lens.core.errors import UserError

    other = capture_forget(planted["base"], planted["data"], tmp_path / "short.zarr", max_length=8)
    with pytest.raises(UserError) as info:
        compute_and_save(planted["caches"]["base"], str(other), tmp_path / "out")
    assert "\n" not in str(info.value)


# --- model side ---------------------------------------------------------------------------------

def _forward(model, ids):
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits, out.hidden_states


def _block_outputs(model, ids) -> list:
    """Every block's output as the next block sees it: hooks registered after any ablation hook.

    (transformers 5 records ``hidden_states`` before later forward hooks run, so they would show
    the residual before the ablation.)
    """
    import torch

    from unlearn_lens.architectures import ArchitectureAdapter

    adapter, seen = ArchitectureAdapter(model), []
    handles = [adapter.block(i).register_forward_hook(
        lambda module, inputs, output: seen.append((output[0] if isinstance(output, tuple) else output).clone()))
        for i in range(adapter.num_layers)]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return [logits, *seen]


def test_ablating_v_makes_the_models_equal_downstream(planted):
    import torch

    from unlearn_lens.attacks.ablation import ablated
    from unlearn_lens.loading import load_model

    base, tokenizer = load_model(str(planted["base"]))
    modified, _ = load_model(str(planted["modified"]))
    ids = torch.tensor([tokenizer("Viruses replicate inside host cells. The river flows.")["input_ids"]])
    logits_b, _ = _forward(base, ids)
    logits_m, _ = _forward(modified, ids)
    assert (logits_b - logits_m).abs().max() > 1e-2  # the planted change matters
    basis = (planted["v"] / np.linalg.norm(planted["v"]))[None, :]
    with ablated(base, basis, [LAYER]), ablated(modified, basis, [LAYER]):
        logits_b, *blocks_b = _block_outputs(base, ids)
        logits_m, *blocks_m = _block_outputs(modified, ids)
    # P(h + v) and P(h) agree up to float32 rounding of O(1) values (~1e-6), carried through 1 block:
    # residual layers LAYER.. (block outputs BLOCK..) and the logits
    assert len(blocks_b) == 3
    for block in range(BLOCK, len(blocks_b)):
        assert torch.allclose(blocks_b[block], blocks_m[block], atol=1e-5), block
    assert torch.allclose(logits_b, logits_m, atol=1e-5)
    assert (blocks_b[BLOCK - 1] - blocks_m[BLOCK - 1]).abs().max() == 0  # before the change: identical
    logits_after, _ = _forward(modified, ids)  # hooks removed on exit
    assert (logits_after - logits_b).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_orthogonalization_equals_ablation_at_every_layer(family):
    import torch

    from unlearn_lens.attacks.ablation import ablated, all_layers, orthogonalize
    from unlearn_lens.testing import make_tiny_model

    hooked, tokenizer = make_tiny_model(family)
    baked, _ = make_tiny_model(family)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(32, 2)))
    basis = q.T
    ids = torch.tensor([tokenizer("Paris is the capital of France. Bacteria divide.")["input_ids"]])
    reference, _ = _forward(baked, ids)
    changed = orthogonalize(baked, basis)
    assert any(".0." in name for name in changed) and any("emb" in name or "wte" in name for name in changed)
    with ablated(hooked, basis, all_layers(hooked), components=True):
        logits_hooked, *_ = _block_outputs(hooked, ids)
    logits_baked, hidden_baked = _forward(baked, ids)
    assert (logits_baked - reference).abs().max() > 1e-3  # the ablation does something
    # the same function computed two ways: float32 rounding only (values O(1), 3 blocks)
    assert torch.allclose(logits_hooked, logits_baked, atol=1e-5)
    v = torch.tensor(basis, dtype=torch.float32)
    for h in hidden_baked[:-1]:  # every residual (before the final norm) is orthogonal to V
        assert (h @ v.T).abs().max() < 1e-4


def test_subspace_is_nested_and_orthonormal():
    from unlearn_lens.attacks.ablation import subspace

    rng = np.random.default_rng(1)
    pcs = np.linalg.qr(rng.normal(size=(8, 3)))[0].T[None]
    directions = {"mean_diff": rng.normal(size=(1, 8)), "pcs": pcs}
    one, three = subspace(directions, 0, 1), subspace(directions, 0, 3)
    assert np.allclose(one[0], directions["mean_diff"][0] / np.linalg.norm(directions["mean_diff"][0]))
    assert np.allclose(three @ three.T, np.eye(3), atol=1e-12)
    assert np.allclose(three[0], one[0])


def test_default_plan_is_a_handful_of_layers():
    from unlearn_lens.attacks.ablation import chosen_layer, default_layers, plan

    # raw norms grow with depth; relative to the base residual's RMS the ranking is different
    relative = np.array([0, 0, 1, 5, 2, 9, 3, 1, 4, 1, 2, 1, 1], dtype=float)  # layers 0, 1 unchanged
    rms = 2.0 ** np.arange(13)
    directions = {"layers": np.arange(13), "mean_diff": (relative * rms)[:, None] * np.eye(1, 4),
                  "relative_norm": relative, "pcs": np.zeros((13, 4, 4))}
    assert int(np.argmax(np.linalg.norm(directions["mean_diff"], axis=1))) == 12  # the raw rule's pick
    assert chosen_layer(directions) == 5
    layers = default_layers(directions, top=2, spread=3)
    # the two largest (layers 5 and 3) and three spread over the 11 changed layers 2..12: positions
    # 2.5, 5, 7.5 of that list, rounded half to even (2, 5, 8): layers 4, 7, 10
    assert layers == [3, 4, 5, 7, 10]
    assert 0 not in layers and 1 not in layers and len(layers) <= 5
    settings = plan(directions, {})
    assert [s for s in settings if s[0] != "single"] == [("per_layer", None, 1), ("per_layer", None, 4),
                                                         ("orthogonalize", 5, 1), ("orthogonalize", 5, 4)]
    everything = plan(directions, {"ablate_modes": ("single", "all", "orthogonalize")})
    assert [s for s in everything if s[0] != "single"] == [("all", 5, 1), ("all", 5, 4), ("orthogonalize", 5, 1),
                                                           ("orthogonalize", 5, 4)]
    assert {(layer, k) for mode, layer, k in settings if mode == "single"} == {(x, k) for x in layers for k in (1, 4)}
    assert plan(directions, {"ablate_layers": (0, 6), "ablate_k": (1,), "ablate_modes": ("single",)}) == \
        [("single", 6, 1)]  # a layer without a difference is skipped
    assert plan(directions, {"ablate_layers": (8, 12), "ablate_k": (1,), "ablate_modes": ("orthogonalize",)}) == \
        [("orthogonalize", 8, 1)]  # among given layers, the largest relative norm (raw: 12)


# --- recovery fractions -------------------------------------------------------------------------

def test_recovery_known_values():
    from analyses.recovery import BASE_COLUMNS, recovery, recovery_rows

    assert recovery(0.5, 0.25, 0.75) == 0.5
    assert recovery(3.0, 4.0, 2.0) == 0.5  # NLL: lower is better, the same formula
    assert math.isnan(recovery(0.3, 0.25, 0.25))
    reference = {"base": {"letter_accuracy": 0.75, "cloze_accuracy": 0.5, "forget_nll": 2.0, "retain_nll": 3.0},
                 "modified": {"letter_accuracy": 0.25, "cloze_accuracy": 0.5, "forget_nll": 4.0, "retain_nll": 3.5}}
    results = [
        {"attack": "x", "setting": "s", "target": "modified", "seconds": 1.0, "extra": {"k": 1},
         "metrics": {"letter_accuracy": 0.5, "cloze_accuracy": 0.75, "forget_nll": 3.0, "retain_nll": 3.5}},
        {"attack": "x", "setting": "s", "target": "control", "seconds": 1.0, "extra": {"k": 1},
         "metrics": {"letter_accuracy": 0.75, "cloze_accuracy": 0.5, "forget_nll": 2.5, "retain_nll": 3.0}},
    ]
    rows, notes = recovery_rows(results, reference)
    mod, control = rows
    assert mod["recovery_letter_accuracy"] == 0.5 and mod["recovery_forget_nll"] == 0.5
    assert mod["recovery_retain_nll"] == 0.0
    assert math.isnan(mod["recovery_cloze_accuracy"])  # base == modified on cloze
    assert mod["recovery_vs_control_letter_accuracy"] == 0.5 and mod["recovery_vs_control_forget_nll"] == 2 / 3
    # the control's cloze accuracy also equals the modified model's: two notes, each printed once
    assert "cloze_accuracy" in mod["note"] and len(notes) == 2 and all("cloze_accuracy" in n for n in notes)
    again, notes_again = recovery_rows([*results, {**results[0], "setting": "t"}], reference)
    assert notes_again == notes and again[2]["note"].startswith("cloze_accuracy")
    assert all(math.isnan(control[c]) for c in BASE_COLUMNS if c.startswith("recovery"))
    assert control["note"] == ""


# --- the command --------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(group, ["attack", *[str(a) for a in args]], catch_exceptions=True)


def common_args(planted, out):
    return ["--base", planted["base"], "--model", planted["modified"], "--name", "unl", "--data", planted["data"],
            "--outdir", out, "--max-length", "32", "--batch-size", "4"]


def test_attack_cli_known_answer_and_rerun(planted, tmp_path):
    from analyses.recovery import BASE_COLUMNS, METRICS, interval_columns

    measured_metrics = [m for m in METRICS if m != "forget_value_nll"]  # no testbed: that one is NaN

    out = tmp_path / "out"
    args = [*common_args(planted, out), "--attacks", "ablate", "--cache-base", planted["caches"]["base"],
            "--cache-model", planted["caches"]["unl"], "--option", f"ablate_layers={LAYER},0,3",
            "--option", "ablate_k=1,2", "--option", "ablate_modes=single,per_layer,all,orthogonalize"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    folder = out / "unl" / "attacks"
    for name in ("attacks.csv", "summary.json", "reference.json", "recovery.png", "ablation_by_layer.png",
                 "directions.npz", "directions.csv", "_COMPLETE"):
        assert (folder / name).is_file(), name
    header, rows = read_csv(folder / "attacks.csv")
    assert header[:len(BASE_COLUMNS)] == list(BASE_COLUMNS)
    assert header[len(BASE_COLUMNS):] == sorted(header[len(BASE_COLUMNS):]) and "layer" in header
    # layer 0 has no difference (skipped); layer LAYER and 3 for k = 1, 2; all and orthogonalize at the top
    settings = {(r["setting"], r["target"]) for r in rows}
    assert ("layer=0,k=1,mode=single", "modified") not in settings
    assert len(rows) == 2 * (2 * 2 + 2 + 2 * 2)
    known = [r for r in rows if r["setting"] == f"layer={LAYER},k=1,mode=single"]
    assert {r["target"] for r in known} == {"modified", "control"}
    row = next(r for r in known if r["target"] == "modified")
    control = next(r for r in known if r["target"] == "control")
    reference = json.loads((folder / "reference.json").read_text())["metrics"]
    for m in measured_metrics:
        # the planted change moved every metric (by more than 1e-3) ...
        assert abs(reference["base"][m] - reference["modified"][m]) > 1e-3, m
        # ... and the ablated modified and ablated base compute the same function up to float32
        # rounding (~1e-6 nats): NLLs equal to 1e-5, the same argmax answers; with the denominator
        # (attacked control - modified) above 1e-2, the recovery is 1 to 1e-6 / 1e-2 = 1e-4
        assert abs(float(control[m]) - reference["modified"][m]) > 1e-2, m
        assert float(row[m]) == pytest.approx(float(control[m]), abs=1e-5), m
        value = float(row[f"recovery_vs_control_{m}"])
        if m.endswith("_nll") or not math.isnan(value):  # NLL gaps are far outside the noise of the texts
            assert value == pytest.approx(1.0, abs=1e-4), m
            low, high = (float(row[c]) for c in interval_columns(f"recovery_vs_control_{m}"))
            assert low <= value <= high, m
        else:  # an accuracy gap of a few questions can be inside the noise: NaN, and the note says so
            assert f"{m}: the attacked control and the modified model: gap inside the evaluation noise" in row["note"]
        assert math.isnan(float(control[f"recovery_{m}"])) and math.isnan(float(control[f"recovery_vs_control_{m}"]))
    # per_layer: layer 2 loses v's line in both models, so they agree from there on (layer 3 too)
    for k in ("1", "2"):
        row, control = (next(r for r in rows if r["setting"] == f"layers=all,k={k},mode=per_layer" and r["target"] == t)
                        for t in ("modified", "control"))
        assert row["layer"] == "" and 1 <= int(row["rank"]) <= int(k)
        for m in measured_metrics:
            assert float(row[m]) == pytest.approx(float(control[m]), abs=1e-5), (k, m)
    # "all" (hooks) and "orthogonalize" (weights) compute the same function: the same metrics
    by_setting = {(r["mode"], r["k"], r["target"]): r for r in rows if r["mode"] in ("all", "orthogonalize")}
    assert len(by_setting) == 8
    for k in ("1", "2"):
        for target in ("modified", "control"):
            hooked, baked = by_setting[("all", k, target)], by_setting[("orthogonalize", k, target)]
            for m in measured_metrics:
                assert float(hooked[m]) == pytest.approx(float(baked[m]), abs=1e-5), (k, target, m)
    # fitted on the cached forget texts that the forget NLL does not measure, and only on them
    from unlearn_lens.data import read_texts
    from unlearn_lens.relearn import split_measure_pool

    texts = read_texts(planted["data"], "forget")
    measured, _ = split_measure_pool(texts)
    fitted = np.load(folder / "directions.npz")["fit_samples"].tolist()
    assert fitted == [i for i, t in enumerate(texts) if t not in set(measured)] and 0 < len(fitted) < len(texts)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best_ablation"]["forget_nll"]["layer"] is not None
    assert set(summary["best_recovery"]) == {"ablate"}

    stamp = (folder / "attacks.csv").stat().st_mtime_ns
    again = invoke(*args)
    assert again.exit_code == 0 and "already done" in again.output
    assert (folder / "attacks.csv").stat().st_mtime_ns == stamp


def test_attack_cli_finds_pipeline_caches(planted, tmp_path):
    out = planted["root"]  # holds caches/base.zarr and caches/unl.zarr
    result = invoke(*common_args(planted, tmp_path / "elsewhere")[:-4], "--outdir", out, "--max-length", "32",
                    "--attacks", "ablate", "--option", f"ablate_layers={LAYER}", "--option", "ablate_k=1",
                    "--option", "ablate_modes=single")
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out / "unl" / "attacks" / "attacks.csv")
    assert len(rows) == 2


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "ablate", "--cache-base", "/nonexistent/base.zarr"], "capture"),
    (["--attacks", "ablate,bogus"], "unknown attack"),
    (["--attacks", "ablate", "--option", "nope=1"], "not an option"),
    (["--attacks", "ablate", "--option", "ablate_k=x"], "ablate_k"),
])
def test_attack_cli_bad_input(planted, tmp_path, extra, message):
    result = invoke(*common_args(planted, tmp_path / "out"), *extra)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()  # refused before any model loads
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_attack_cli_refuses_caches_of_other_data(planted, tmp_path):
    """Cache samples can be told from measured texts only when the cache was captured from --data."""
    data = shutil.copytree(planted["data"], tmp_path / "data")
    (data / "manifest.json").write_text(json.dumps({"hash": "another-hash"}))
    args = common_args(planted, tmp_path / "out")
    args[args.index("--data") + 1] = data
    result = invoke(*args, "--attacks", "ablate", "--cache-base", planted["caches"]["base"],
                    "--cache-model", planted["caches"]["unl"], "--option", "ablate_modes=single")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ablate:") and "other data" in result.output
    assert not (tmp_path / "out").exists()  # refused before any model loads


def test_attack_cli_mismatched_caches(planted, tmp_path):
    other = capture_forget(planted["base"], planted["data"], tmp_path / "short.zarr", max_length=8)
    result = invoke(*common_args(planted, tmp_path / "out"), "--attacks", "ablate",
                    "--cache-base", other, "--cache-model", planted["caches"]["unl"])
    assert result.exit_code == 2, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_missing_attack_module_fails_in_one_line(planted, tmp_path, monkeypatch):
    from unlearn_lens.attacks import base

    monkeypatch.setitem(base.ATTACKS, "quantize", "unlearn_lens.attacks.no_such_module:run")
    result = invoke(*common_args(planted, tmp_path / "out"), "--attacks", "quantize")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not available" in lines[0], result.output
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_orthogonalization_equals_ablation(smollm2_dir):
    """The invariant on the real SmolLM2 (tied embeddings, RMSNorm, no biases), two random directions."""
    import torch

    from unlearn_lens.attacks.ablation import ablated, all_layers, orthogonalize
    from unlearn_lens.loading import load_model

    hooked, tokenizer = load_model(str(smollm2_dir), dtype="float32")
    baked, _ = load_model(str(smollm2_dir), dtype="float32")
    hidden = hooked.config.hidden_size
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(hidden, 2)))[0].T
    ids = torch.tensor([tokenizer("The mitochondrion is the powerhouse of the cell.")["input_ids"]])
    orthogonalize(baked, basis)
    with ablated(hooked, basis, all_layers(hooked), components=True):
        logits_hooked, *_ = _block_outputs(hooked, ids)
    logits_baked, *blocks = _block_outputs(baked, ids)
    # 30 blocks of float32 with residual norms in the tens: 1e-3 on logits of magnitude ~10-30
    assert (logits_hooked - logits_baked).abs().max() < 1e-3
    v = torch.tensor(basis, dtype=torch.float32)
    scale = max(float(b.abs().max()) for b in blocks)
    assert max(float((b @ v.T).abs().max()) for b in blocks) < 1e-5 * scale


def test_ablation_report_script_on_a_demo_layout(planted, tmp_path):
    """scripts/ablation_report.py on a demo-shaped folder holding the planted pair: the chosen layer
    is the planted one's, the raw norm's the last, and per_layer recovers against its control."""
    import importlib.util

    out = tmp_path / "demo"
    shutil.copytree(planted["base"], out / "models" / "smollm2")
    shutil.copytree(planted["modified"], out / "unlearning" / "unl" / "model")
    shutil.copytree(planted["data"], out / "data")
    for name, cache in (("smollm2", "base"), ("unl", "unl")):
        shutil.copytree(planted["caches"][cache], out / "caches" / f"{name}.zarr")
    spec = importlib.util.spec_from_file_location("ablation_report", Path(__file__).parents[1] / "scripts" /
                                                  "ablation_report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.demo_models(out) == ["unl"]
    (row,) = script.run(out, ["unl"])
    assert row["chosen_layer"] == LAYER and row["raw_norm_layer"] == LAYER + 1 and row["layers"] == 3
    assert row["n_questions"] == 4 and row["fitted_texts"] > 0
    assert math.isfinite(row["per_layer_forget_nll"]) and math.isfinite(row["single_forget_nll"])
    text = script.table([row])
    assert text.splitlines()[2].startswith(f"| unl | {LAYER} (of 3) | {LAYER + 1} |")
    assert (out / "ablation_report" / "unl" / "attacks" / "_COMPLETE").is_file()
    assert not (out / "unl").exists()  # the demo's own attack folders are untouched
