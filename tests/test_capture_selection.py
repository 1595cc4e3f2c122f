"""A cache sized on purpose (issue 24): --layers, --token-sample and --variables keep exact slices of
a full capture, analyze works on them, --plan predicts the bytes, a capture that would not fit is
refused before any model loads, and several writer threads write the same bytes as one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_capture import tree_bytes, write_data

SPLITS = ("forget", "retain", "wmdp", "wmdp_cloze")


def settings(**overrides):
    from unlearn_lens.capture import CaptureSettings

    base = dict(batch_size=3, block_samples=4, dtype="float32", progress=False, token_chunk=16)
    return CaptureSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny llama, its data, and a full float32 capture of every split (the reference)."""
    from unlearn_lens.capture import capture
    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("selection")
    data = write_data(root / "data")
    model = save_tiny_model("llama", root / "model")
    full = root / "full.zarr"
    assert set(capture(str(model), data, str(full), settings()).values()) == {"complete"}
    return {"root": root, "data": data, "model": model, "full": full}


@pytest.fixture(scope="module")
def partial(study):
    """The same capture with --layers every:2 --token-sample 8."""
    from unlearn_lens.capture import Selection, capture

    out = study["root"] / "partial.zarr"
    chosen = settings(selection=Selection(layers="every:2", token_sample=8, seed=3))
    assert set(capture(str(study["model"]), study["data"], str(out), chosen).values()) == {"complete"}
    return out


# --- what is kept -----------------------------------------------------------------------------------

def test_layer_spec_and_token_positions_known_answers():
    from unlearn_lens.capture.selection import Selection, parse_layers, resolve, sample_positions
    from unlearn_lens.core.errors import UserError

    assert parse_layers("every:8", 32) == [0, 8, 16, 24, 32]
    assert parse_layers("0-3,10,every:16", 32) == [0, 1, 2, 3, 10, 16, 32]
    kept = resolve(Selection(layers="5,9"), 32)
    assert kept.resid_layers == (5, 9, 32) and kept.mlp_layers == (5, 9)  # the final layer L always kept
    assert resolve(Selection(), 32).full and resolve(Selection(), 32).attrs() is None
    for bad in ("33", "4-2", "every:0", "x"):
        with pytest.raises(UserError, match="--layers"):
            parse_layers(bad, 32)
    with pytest.raises(UserError, match="keeps no MLP input"):
        resolve(Selection(layers="32"), 32)
    lengths = np.array([3, 20, 50])
    positions = sample_positions("forget", lengths, 8, seed=0)
    assert [len(p) for p in positions] == [3, 8, 8]
    assert all(p[-1] == n - 1 and np.all(np.diff(p) > 0) for p, n in zip(positions, lengths))
    # drawn per text: the same text gets the same positions whatever else is read
    assert np.array_equal(sample_positions("forget", lengths[:2], 8, seed=0)[1], positions[1])
    assert not np.array_equal(sample_positions("forget", lengths, 8, seed=1)[2], positions[2])
    cloze = sample_positions("wmdp_cloze", np.array([30]), 4, 0, {"cont_start": np.array([20]),
                                                                  "cont_end": np.array([26])})[0]
    assert set(range(19, 26)) <= set(cloze.tolist()) and cloze[-1] == 29  # scored positions + the last


def test_partial_capture_equals_slices_of_the_full_one_to_the_bit(study, partial):
    import cache_store
    from unlearn_lens.capture.selection import sample_positions

    for split in SPLITS:
        full, part = cache_store.open_cache(str(study["full"]), split), cache_store.open_cache(str(partial), split)
        layers = part["layer"].values
        assert list(layers) == [0, 2, 3] and list(part["mlp_layer"].values) == [0, 2]  # L = 3 always kept
        assert part.attrs["selection"]["token_sample"] == 8
        np.testing.assert_array_equal(part["text_input_ids"].values, full["input_ids"].values)  # ids complete
        np.testing.assert_array_equal(part["text_length"].values, full["sample_length"].values)
        expected = sample_positions(split, full["sample_length"].values, 8, 3,
                                    {k: full[k].values for k in ("cont_start", "cont_end") if k in full})
        index = []
        for sample, kept in enumerate(expected):
            got = part.ulens.sample(sample)
            np.testing.assert_array_equal(got["token_position"].values, kept)
            np.testing.assert_array_equal(part.ulens.tokens_of(sample), full.ulens.tokens_of(sample))
            index.append(int(full["sample_offset"][sample]) + kept)
        index = np.concatenate(index)
        np.testing.assert_array_equal(part["input_ids"].values, full["input_ids"].values[index])
        np.testing.assert_array_equal(part["resid"].values, full["resid"].sel(layer=layers).values[:, index])
        np.testing.assert_array_equal(part["mlp_in"].values, full["mlp_in"].sel(mlp_layer=[0, 2]).values[:, index])
        np.testing.assert_array_equal(part["last"].values, full["last"].sel(layer=layers).values)
        for name in ("final_letter_logits", "final_cloze_logprob"):
            if name in full:
                np.testing.assert_array_equal(part[name].values, full[name].values)


def test_variables_leave_an_array_out_and_verify_accepts_partial_caches(study, partial, tmp_path):
    import cache_store
    from cache_store.inspect import verify
    from unlearn_lens.capture import Selection, capture

    assert verify(str(partial)) == []
    out = tmp_path / "resid-only.zarr"
    capture(str(study["model"]), study["data"], str(out),
            settings(splits=("retain",), selection=Selection(variables=("resid",))))
    ds = cache_store.open_cache(str(out), "retain")
    assert "mlp_in" not in ds and "resid" in ds and verify(str(out)) == []
    full = cache_store.open_cache(str(study["full"]), "retain")
    np.testing.assert_array_equal(ds["resid"].values, full["resid"].values)


def analyze(caches: dict[str, Path], outdir: Path, models: dict[str, Path]) -> dict:
    from analyses.activations.caches import open_model_caches
    from analyses.activations.runner import AnalyzeOptions, run_analysis
    from analyses.weights.checkpoints import open_checkpoint

    opened = {name: open_model_caches(str(url)) for name, url in caches.items()}
    checkpoints = {name: open_checkpoint(str(path)) for name, path in models.items()}
    return run_analysis(opened, "base", outdir, AnalyzeOptions(progress=False), checkpoints=checkpoints)


def read_csv(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_analyze_on_partial_caches_equals_the_full_caches_on_the_kept_layers(study, partial, tmp_path):
    """Norms from a partial cache equal those of the full cache's same layers and tokens (numpy)."""
    import json

    import cache_store
    from conftest import scale_block_mlp
    from unlearn_lens.capture import Selection, capture

    modified = scale_block_mlp(study["model"], tmp_path / "modified")  # block 1's MLP changed
    chosen = settings(selection=Selection(layers="every:2", token_sample=8, seed=3))
    full_modified, partial_modified = tmp_path / "full-m.zarr", tmp_path / "partial-m.zarr"
    capture(str(modified), study["data"], str(partial_modified), chosen)
    capture(str(modified), study["data"], str(full_modified), settings())
    models = {"base": study["model"], "edited": modified}
    written = analyze({"base": partial, "edited": partial_modified}, tmp_path / "out", models)
    rows = read_csv(Path(written["comparisons"]["edited"]) / "activation_stats" / "activation_stats.csv")
    assert sorted({int(r["layer"]) for r in rows}) == [0, 2, 3]
    for split in ("forget", "retain"):
        part = cache_store.open_cache(str(partial), split)
        a = cache_store.open_cache(str(study["full"]), split)
        b = cache_store.open_cache(str(full_modified), split)
        index = np.concatenate([int(a["sample_offset"][s]) + part.ulens.sample(s)["token_position"].values
                                for s in range(part.sizes["sample"])])
        for layer in (0, 2, 3):
            ha, hb = (x["resid"].sel(layer=layer).values[index].astype(np.float64) for x in (a, b))
            row = next(r for r in rows if r["split"] == split and int(r["layer"]) == layer)
            assert float(row["model_a_norm_L2"]) == pytest.approx(np.linalg.norm(ha, axis=1).mean(), rel=1e-5)
            assert float(row["mean_dh_L2"]) == pytest.approx(np.linalg.norm(hb - ha, axis=1).mean(), rel=1e-5,
                                                             abs=1e-9)
    lens = read_csv(Path(written["models"]["base"]["wmdp_logit_lens"]) / "wmdp_lens_results.csv")
    assert sorted({int(r["layer"]) for r in lens}) == [0, 2, 3]
    # the same analysis of the full caches gives the same probes (last is complete) on the kept layers
    whole = analyze({"base": study["full"], "edited": full_modified}, tmp_path / "full-out", models)
    probes = {(r["layer"], r["auc"]) for r in read_csv(Path(whole["models"]["base"]["linear_probes"]) /
                                                       "probe_results.csv") if int(r["layer"]) in (0, 2, 3)}
    assert probes == {(r["layer"], r["auc"]) for r in read_csv(Path(written["models"]["base"]["linear_probes"]) /
                                                               "probe_results.csv")}
    # block 1's MLP input (mlp_layer 1) was not kept: its row-space row is left out, and said so
    folder = Path(written["comparisons"]["edited"]) / "row_space_projection"
    summary = json.loads((folder / "summary.json").read_text())
    assert "row space of blocks 1" in summary["not_captured"] and any("blocks 1" in n for n in written["notes"])
    spaces = {(r["space"], r["mlp_layer"]) for r in read_csv(folder / "row_space_projection.csv")}
    assert ("column", "1") in spaces and not any(space == "row" and layer == "1" for space, layer in spaces)
    # the report reads the partial outputs like any others
    from analyses.report import discover, signature_table, write_report

    assert write_report(discover(tmp_path / "out")).stat().st_size > 0
    rows = {row["metric"]: row["edited"] for row in signature_table(discover(tmp_path / "out"))}
    assert rows["logit lens cloze accuracy, final layer"] not in ("", None)


def test_analyze_refuses_caches_that_kept_different_layers(study, partial):
    import cache_store
    from analyses.activations.inputs import validate_caches
    from unlearn_lens.core.errors import UserError

    caches = {"base": {s: cache_store.open_cache(str(study["full"]), s) for s in ("forget", "retain")},
              "edited": {s: cache_store.open_cache(str(partial), s) for s in ("forget", "retain")}}
    with pytest.raises(UserError, match="--layers"):
        validate_caches(caches, "base")
    with pytest.raises(UserError, match="different layers|kept different token positions"):
        cache_store.open_caches({"a": str(study["full"]), "b": str(partial)}, "forget")


def test_readers_that_need_every_layer_say_so(partial, capsys):
    from analyses.activations.attack_directions import difference_moments
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.tuned_lens.cache_data import open_cache_splits

    with pytest.raises(UserError, match="keep residual layers 0,2,3 only .*the ablation attack needs every layer"):
        difference_moments(str(partial), str(partial))
    assert open_cache_splits(str(partial)) == {}  # the tuned lens runs the model instead, and says so
    assert "partial capture of forget, retain, wmdp, wmdp_cloze" in capsys.readouterr().err


# --- the plan ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chosen", [dict(), dict(layers="every:2", token_sample=8)], ids=["full", "partial"])
def test_plan_predicts_the_bytes_written_within_ten_percent(study, tmp_path, chosen):
    from cache_store.inspect import describe
    from unlearn_lens.capture import Selection, capture, plan_only

    out = tmp_path / "c.zarr"
    run = settings(splits=("forget", "retain"), dtype="float16", token_chunk=None, selection=Selection(**chosen))
    plan = plan_only(str(study["model"]), study["data"], str(out), run)
    assert not out.exists()  # --plan writes nothing
    capture(str(study["model"]), study["data"], str(out), run)
    written = sum(entry["bytes_stored"] for entry in describe(str(out))["splits"].values())
    assert plan.total == pytest.approx(written, rel=0.10), (plan.lines(), written)
    assert [s.kept_tokens for s in plan.splits] == [describe(str(out))["splits"][s]["tokens_real"]
                                                    for s in ("forget", "retain")]


def test_a_capture_that_would_not_fit_is_refused_before_any_model_loads(study, tmp_path, monkeypatch):
    import unlearn_lens.loading
    from unlearn_lens.capture import capture, plan, plan_only
    from unlearn_lens.core.errors import UserError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(unlearn_lens.loading, "load_model", no_model)
    needed = plan_only(str(study["model"]), study["data"], str(tmp_path / "c.zarr"), settings()).total
    monkeypatch.setattr(plan, "free_bytes", lambda out: int(needed / 3))  # a disk that holds a third of it
    with pytest.raises(UserError) as caught:
        capture(str(study["model"]), study["data"], str(tmp_path / "c.zarr"), settings())
    message = str(caught.value)
    assert "would take" in message and "these would fit: --" in message and "\n" not in message
    assert not (tmp_path / "c.zarr").exists()


def test_plan_command_prints_sizes_and_the_bound(study, tmp_path):
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.group, ["capture", "--model", str(study["model"]), "--data", str(study["data"]),
                                           "--out", str(tmp_path / "c.zarr"), "--plan", "--layers", "every:2",
                                           "--token-sample", "8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("plan: 3 layers x 32 hidden") and "resid layers 0,2,3" in lines[0]
    assert any(line.startswith("forget ") for line in lines) and "free at" in result.output
    assert "bound: " in lines[-1] and not (tmp_path / "c.zarr").exists()


# --- the writer -------------------------------------------------------------------------------------

def test_two_writer_threads_give_the_bytes_of_one(study, tmp_path):
    from unlearn_lens.capture import capture

    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    capture(str(study["model"]), study["data"], str(one), settings(writer_threads=1))
    capture(str(study["model"]), study["data"], str(two), settings(writer_threads=2, codec="zstd1"))
    assert tree_bytes(one) == tree_bytes(two)
    none = tmp_path / "none.zarr"
    capture(str(study["model"]), study["data"], str(none), settings(writer_threads=2, codec="none"))
    import cache_store

    for split in SPLITS:
        np.testing.assert_array_equal(cache_store.open_cache(str(none), split)["resid"].values,
                                      cache_store.open_cache(str(one), split)["resid"].values)
