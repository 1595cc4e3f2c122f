"""A short RMU run on the real SmolLM2-135M raises forget NLL more than retain NLL."""

from __future__ import annotations

import pytest

from conftest import UNLEARN_FORGET, UNLEARN_RETAIN, write_unlearn_data


@pytest.mark.slow
@pytest.mark.smollm2
def test_rmu_on_smollm2_forgets_more_than_it_retains(smollm2_dir, tmp_path):
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method="rmu",
                        steps=8, batch_size=4, max_length=32, lr=3e-3, steering_coeff=100.0, alpha=100.0,
                        eval_split=0.0, device="cpu", eval_every=1000)
    result = train(cfg, progress=False)
    assert cfg.layer_id == 7 and cfg.update_layers == [5, 6, 7]  # WMDP's defaults, resolved on 30 layers
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    assert forget_rise > 0.1
    assert forget_rise > 3 * retain_rise


@pytest.mark.slow
@pytest.mark.smollm2
def test_rmu_reference_preset_on_smollm2_forgets_more_than_it_retains(smollm2_dir, tmp_path):
    """WMDP's published hyper-parameters (steering 6.5, alpha 1200, lr 5e-5 constant, no clipping,
    layer 7 / down-projections of 5-7 of 32, scaled to SmolLM2's 30 layers), only shorter."""
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method="rmu",
                        preset="reference", steps=12, max_length=32, eval_split=0.0, device="cpu", eval_every=1000)
    cfg.apply_preset({"steps", "max_length", "eval_split", "device", "eval_every"})
    result = train(cfg, progress=False)
    assert (cfg.steering_coeff, cfg.alpha, cfg.lr, cfg.grad_clip, cfg.lr_scheduler) == (6.5, 1200.0, 5e-5, 0.0, "constant")
    assert cfg.layer_id == 7 and cfg.update_layers == [5, 6, 7] and cfg.update_roles == ["down"]
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    # 12 steps at WMDP's lr 5e-5 (it runs 150): on this machine forget +0.0127, retain -0.0003 nats
    assert forget_rise > 0.005
    assert forget_rise > retain_rise + 0.005


def _reference_run(smollm2_dir, tmp_path, method: str, shortened: dict):
    """Run ``method``'s reference preset with the ``shortened`` flags on SmolLM2 and save it; returns
    (forget NLL rise, retain NLL rise, the run's config.json, its train log)."""
    import json

    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import save_run, train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    given = {**shortened, "eval_split": 0.0, "device": "cpu", "eval_every": 1000}
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method=method,
                        preset="reference", **given)
    cfg.apply_preset(set(given))
    result = train(cfg, progress=False)
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    out = save_run(result)
    return forget_rise, retain_rise, json.loads((out / "config.json").read_text()), result.log


@pytest.mark.slow
@pytest.mark.smollm2
def test_cb_lat_reference_preset_on_smollm2_forgets_more_than_it_retains(smollm2_dir, tmp_path):
    """Deep ignorance's rr-lat as its run script rr-lat.sh calls it (retain_coef 5, remove_coef 300
    = alpha 5 x forget weight 60, lr 2e-3 linear, combined adversary at the embedding, adv_lr 2e-3
    x 4, LoRA r16 on PEFT's default modules for SmolLM2's Llama architecture (q_proj, v_proj) up to
    the last target, targets 5..30 of 32 scaled to SmolLM2's 30 layers, the retain anchor's padded
    mean), only shorter: the first 16 steps (--stop-after) of a 48-step run of batch 4 without
    accumulation (the reference: 62 steps of 1 x 32; 32 adversary fits per step do not fit a CPU
    test). A run whose schedule itself is 16 or 20 steps long does not reroute: its retain
    coefficient reaches 5 and its lr falls before the rerouting takes hold (measured: forget -0.16,
    retain -0.05 nats after 20 of 20 steps). The adversary makes the forget activations differ from
    the frozen ones from the first step, so the rerouting term has a gradient at once (compare the
    cb test)."""
    shortened = {"steps": 48, "stop_after": 16, "batch_size": 4, "grad_accum_steps": 1, "max_length": 32}
    forget_rise, retain_rise, record, _ = _reference_run(smollm2_dir, tmp_path, "cb_lat", shortened)
    cfg, resolved = record["config"], record["resolved"]
    assert (cfg["cb_variant"], cfg["alpha"], cfg["forget_weight"], cfg["lr"], cfg["adversary"], cfg["lat_steps"]) == (
        "rr", 5.0, 60.0, 2e-3, "combined", 4)
    assert cfg["adversary_layers"] == [-1] and cfg["target_layers"] == [4, 8, 13, 18, 22, 27]
    assert (resolved["total_steps"], resolved["run_steps"]) == (48, 16)
    assert resolved["lora_targets"] == ["q_proj", "v_proj"] and resolved["lora_target_rule"] == "peft-default"
    weights = resolved["loss_weights"]
    assert (weights["retain_coef"], weights["remove_coef"], weights["retain_mean"]) == (5.0, 300.0, "padded")
    assert weights["adversary"] == {"toward": 1.0, "away": 0.0}
    # measured (CPU, one thread): forget +6.64, retain +0.09 nats after 16 of 48 steps; the whole
    # 48-step run: +12.99 / -0.07 (forget +0.06 after 8 steps: the rerouting takes hold at 8-16). With every linear adapted (--lora-targets all-linear, the preset's
    # choice before) a 16-step run rerouted on its own: +7.14 / -0.005
    assert forget_rise > 3.0
    assert retain_rise < 0.3
    assert forget_rise > retain_rise + 3.0


@pytest.mark.slow
@pytest.mark.smollm2
def test_lat_reference_preset_on_smollm2_does_not_yet_raise_forget_nll(smollm2_dir, tmp_path):
    """Targeted LAT as the WMDP notebook runs it (targeted adversary at layer 7 of 32, eps 2, inner
    lr 5e-2, toward forget / away from retain 1 / 1; defender toward retain under the attack 1, away
    log(1 - p) on forget 1, retain SFT 4, normalised; LoRA r64 alpha 8, lr 5e-5 constant, clip 0.5,
    batch 4), only shorter: 6 of 200 steps, 4 of 16 adversary iterations, 32 tokens.

    What it does on SmolLM2 in so short a run is pinned here, not the issue's proof: the retain
    terms carry 5/6 of the defender's weight and lower both NLLs (the forget and retain texts share
    their plain style, and the 8 retain texts repeat), the bounded away term only slows the forget
    NLL's fall: measured forget -0.010, retain -0.088 nats after 8 steps, -0.053 / -0.395 after 32
    (2 adversary iterations). Forget NLL does not rise within a CPU test's budget (the reference
    runs 200 steps of 4 defender updates each)."""
    shortened = {"steps": 6, "batch_size": 4, "max_length": 32, "lat_steps": 4}
    forget_rise, retain_rise, record, log = _reference_run(smollm2_dir, tmp_path, "lat", shortened)
    cfg, resolved = record["config"], record["resolved"]
    assert (cfg["adversary"], cfg["lat_defender"], cfg["lat_eps"], cfg["adversary_lr"], cfg["lr"]) == (
        "targeted", "away", 2.0, 5e-2, 5e-5)
    assert cfg["adversary_layers"] == [7] and cfg["lora_r"] == 64 and cfg["lora_alpha"] == 8.0
    assert resolved["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert resolved["lora_target_rule"] == "all-linear"
    assert resolved["loss_weights"] == {"defender": {"toward": 1 / 6, "away": 1 / 6, "sft": 4 / 6},
                                        "adversary": {"toward": 0.5, "away": 0.5}}
    assert all(row["adversary_nll"] < row["adversary_start_nll"] for row in log)  # the attack helps recall
    assert all(row["toward_loss"] > 0 and row["adversary_away_loss"] > 0 for row in log)
    # measured (CPU, one thread): forget -0.008, retain -0.066 nats after 6 steps
    assert -0.2 < retain_rise < 0.0
    assert abs(forget_rise) < 0.05  # the away term does not yet raise forget NLL
    assert forget_rise > retain_rise + 0.02  # it falls less than retain NLL


@pytest.mark.slow
@pytest.mark.smollm2
def test_cb_rr_reference_preset_on_smollm2_holds_retain_but_does_not_reroute(smollm2_dir, tmp_path):
    """Where issue #14's cb proof stands: GraySwan's settings (rr, alpha 10, targets 10, 20 of 32,
    LoRA r16 up to the last target, lr 1e-4 constant, batch 16, the retain anchor's padded mean) do
    NOT raise forget NLL on SmolLM2, so this test pins what they do instead, only shorter (8 of 150
    steps, 32 tokens: the padded mean then divides by 32 positions, not GraySwan's 1024).

    At the LoRA start (B = 0) the adapted and frozen activations are equal: the rerouting term
    ReLU(cos) is at its maximum, where its gradient vanishes (step-1 gradient norm ~2e-8), and it
    then grows only with the deviation, while the retain anchor's gradient has unit norm per token
    (tests/test_unlearn_rr_start.py). Adam's first step is lr g / (|g| + eps): the step-1 gradient,
    ~2e-8 in total over 3.1M trainable weights (1.3e-11 RMS per weight, three orders below Adam's eps
    1e-8; float32 rounding, so its size varies with the thread count), moves the LoRA B weights by 1.4e-7 RMS = 0.0014 lr (at most 0.26 lr, where a weight's
    gradient nears eps), not by about lr (tests/data/unlearn_measurements/cb_first_adam_step.py, at
    t = 1 of 150). The start thus barely moves, and from there the retain anchor pulls the adapter
    back and the forget cosine never leaves 1. Measured on this machine with the full reference run (150 steps,
    batch 16, 32 tokens; before LoRA dropout was on): 1 - cos < 1e-6 at every step, forget NLL
    -0.0000, retain -0.0004 nats.
    Neither more steps nor a seeded start (LoRA B ~ N(0, 0.01^2): 1 - cos ~ 1e-4, unchanged over 16
    steps), nor the reference's literal t/300 schedule at lr 1e-3, nor forget weight 30 at lr 1e-3
    moved it; with the retain anchor off (c_retain ~ 0) the rerouting escapes within 10 steps at lr
    1e-3 but wrecks retain too (forget +8.5, retain +5.8 nats in 12 steps), as does forget weight
    1e4 (+6.0 / +5.9). cb_lat differs: its adversary makes the forget activations differ from the
    frozen ones from the first step (see the test above). If a change makes cb reroute, replace this
    test with the forget-more-than-retain proof."""
    from unlearn_lens.evaluation import mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = write_unlearn_data(tmp_path / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    base, tokenizer = load_model(str(smollm2_dir))
    forget_before = mean_token_nll(base, tokenizer, UNLEARN_FORGET)
    retain_before = mean_token_nll(base, tokenizer, UNLEARN_RETAIN)
    del base
    shortened = {"steps": 8, "max_length": 32, "eval_split": 0.0, "device": "cpu", "eval_every": 1000}
    cfg = UnlearnConfig(model=str(smollm2_dir), data=str(data), outdir=str(tmp_path / "out"), method="cb",
                        preset="reference", **shortened)
    cfg.apply_preset(set(shortened))
    result = train(cfg, progress=False)
    assert (cfg.cb_variant, cfg.alpha, cfg.lr, cfg.batch_size, cfg.lora) == ("rr", 10.0, 1e-4, 16, True)
    assert cfg.target_layers == [8, 18]
    assert result.log[0]["grad_norm"] < 1e-6  # the stationary start
    assert all(row["forget_loss"] > 1 - 1e-5 for row in result.log)  # mean ReLU(cos) stays at 1
    assert any(row["retain_loss"] > 0 for row in result.log[1:])  # the adapter did move
    forget_rise = mean_token_nll(result.model, tokenizer, UNLEARN_FORGET) - forget_before
    retain_rise = mean_token_nll(result.model, tokenizer, UNLEARN_RETAIN) - retain_before
    # measured (8 steps; the same with --rr-retain-mean tokens): step-1 gradient norm 1.8e-8, forget
    # -0.0001, retain +0.0011 nats, 1 - mean ReLU(cos) <= 7e-7 at every step
    assert abs(forget_rise) < 0.01 and abs(retain_rise) < 0.01


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.long
def test_lat_reference_preset_in_full_raises_the_forgotten_values_nll(smollm2_dir, tmp_path):
    """The issue's proof for lat, in the only form measured to hold: the whole reference run (200 steps;
    4 adversary iterations of the reference's 16, to fit a CPU) on the planted-facts testbed raises the
    NLL of the forgotten facts' *values* (``forget_value_nll``), while retain NLL stays within bound.

    Short runs do not: 24 steps moved A's value NLL by 0.000 [-0.001, 0.001] (n = 60), and the whole-text
    forget NLL falls in any run (-4.59 nats after 200 steps), because planting with the loss on the
    values left the templates' tokens far above the unplanted model's and every retain term repairs them
    (README, "The planted-facts testbed"). Measured (one 2-core CPU, 2 threads, 2552 s): A's values
    +0.166 [0.114, 0.223], B's values +0.109 [0.072, 0.151], retain NLL 5.45 -> 2.37. Skipped unless
    UNLEARN_LENS_LONG_TESTS=1 (3818 s here with UNLEARN_LENS_TEST_THREADS=2, passed, 2026-12-07)."""
    from analyses.uncertainty import PER_ITEM, change_estimate
    from unlearn_lens.core.settings import ModelRef
    from unlearn_lens.evaluation import evaluate
    from unlearn_lens.loading import load_model
    from unlearn_lens.plant import PlantSettings, run_plant
    from unlearn_lens.testbed import create_testbed, group_texts, read_entities, value_spans
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.trainer import train

    data = tmp_path / "data"
    create_testbed(data, facts=40, seed=0)  # the study's testbed
    planted = run_plant(PlantSettings(model=ModelRef(str(smollm2_dir)), data=str(data), outdir=str(tmp_path / "planted"),
                                      progress=False)) / "model"
    entities, spans = read_entities(data), value_spans(data)
    texts = {"A": group_texts(entities, ("A1", "A2")), "B": group_texts(entities, ("B",))}

    def values_nll(model, tokenizer) -> dict:
        return {group: evaluate(model, tokenizer, forget_texts=members, retain_texts=[], value_spans=spans,
                                max_length=64)[PER_ITEM]["forget_value_nll"] for group, members in texts.items()}

    base, tokenizer = load_model(str(planted))
    before = values_nll(base, tokenizer)
    del base
    given = {"lat_steps": 4, "max_length": 64, "eval_every": 1000}
    cfg = UnlearnConfig(model=str(planted), data=str(data), outdir=str(tmp_path / "out"), method="lat",
                        preset="reference", **given)
    cfg.apply_preset(set(given))
    result = train(cfg, progress=False)
    assert (cfg.lr, cfg.lora_r, cfg.adversary_layers, result.resolved["total_steps"]) == (5e-5, 64, [7], 200)
    after = values_nll(result.model, tokenizer)
    forgotten, kept = (change_estimate(before[g], after[g]) for g in ("A", "B"))
    assert forgotten.n == 60 and forgotten.low > 0.05  # measured +0.166 [0.114, 0.223]
    assert kept.high < 0.3  # measured +0.109 [0.072, 0.151]
    retain_change = result.eval_after["retain_nll"] - result.eval_before["retain_nll"]
    assert retain_change < 0.1  # measured -3.08: the templates repaired, general text not harmed
    assert result.eval_after["retain_cloze_accuracy"] >= 0.85  # B's facts kept (0.967 -> 0.933)
