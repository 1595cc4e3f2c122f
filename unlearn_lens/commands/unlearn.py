"""`unlearn-lens unlearn` and `unlearn-lens unlearn-all`: produce unlearned models.

Both run unchanged under ``accelerate launch`` (DDP or FSDP; see docs/accelerate/). Input errors
are reported in one line with exit status 2 before any model loads or training starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from unlearn_lens import options
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.outputs import UNLEARN_EVAL_JSON
from unlearn_lens.core.settings import TRAIN_BATCH_SIZE
from unlearn_lens.unlearning import presets
from unlearn_lens.unlearning.config import (ADVERSARIES, CB_VARIANTS, LAT_DEFENDERS, LAT_NORMS, METHODS, OPTIMIZERS,
                                            RR_RETAIN_MEANS, SCHEDULERS, UnlearnConfig)
from unlearn_lens.unlearning.method_names import FORGET_WEIGHTED, FORGET_WEIGHTED_RR, reads_forget_weight


#: unlearn's device default: accelerate chooses (the other commands default to the CPU).
UNLEARN_DEVICE = "auto"


def _ints(value: str | None) -> list[int] | None:
    if value is None or not value.strip():
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {value!r}") from None


def _strs(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _shared_options(func):
    """Every training flag, shared by ``unlearn`` and ``unlearn-all``."""
    flags = [
        options.model("model", help="Base model: hub id, local HF directory or .gguf file."),
        options.revision(),
        options.data("data"),
        options.outdir(help="Output directory (model/, config.json, train_log.csv, eval.json, COMPLETE)."),
        click.option("--preset", default=presets.DEFAULT_PRESET, show_default=True,
                     help="Named hyper-parameter set of the method: default (this tool's defaults), original (what "
                          "unlearn did before presets: as default except cb_lat's adversary, kept on the scored "
                          "layer) or reference (the published configuration); flags given "
                          "explicitly override it (--layer-id also the preset's layers derived from it). Every preset and its source: see the end of this help."),
        click.option("--steps", type=int, default=None,
                     help="Optimizer steps (default: one epoch over the forget training texts)."),
        click.option("--epochs", type=int, default=None, help="Epochs over the forget training texts (instead of --steps)."),
        click.option("--stop-after", type=int, default=None,
                     help="Train only the first N optimizer steps of the run: the LR and loss-coefficient schedules "
                          "and the data order keep the full run's length (a short look at a long recipe)."),
        options.batch_size(TRAIN_BATCH_SIZE, help="Forget and retain texts per batch, per process."),
        click.option("--grad-accum-steps", type=int, default=1, show_default=True,
                     help="Micro-batches accumulated per optimizer step."),
        options.max_length(),
        options.max_samples(help="Use at most this many forget and retain training texts."),
        click.option("--eval-split", type=float, default=0.1, show_default=True,
                     help="Fraction of forget and retain texts held out for the eval losses (logged and in eval.json)."),
        click.option("--eval-every", type=int, default=None,
                     help="Log held-out forget/retain NLL every N steps (default: 5 times per run)."),
        options.eval_batch_size(),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
                     help="Optimizer (adafactor: transformers' Adafactor with a fixed LR)."),
        click.option("--lr", type=float, default=1e-5, show_default=True, help="Peak learning rate."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True, help="Weight decay."),
        click.option("--momentum", type=float, default=0.0, show_default=True, help="Momentum of sgd / rmsprop."),
        click.option("--lr-scheduler", type=click.Choice(SCHEDULERS), default="cosine", show_default=True,
                     help="LR schedule over the run (cosine annealing to zero by default)."),
        click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear LR warm-up steps."),
        click.option("--warmup-epochs", type=float, default=None,
                     help="LR warm-up as a fraction of epochs over the forget texts (open-unlearning's warmup_epochs; "
                          "instead of --warmup-steps)."),
        click.option("--grad-clip", type=float, default=1.0, show_default=True,
                     help="Clip the global gradient norm to this (0 disables)."),
        options.seed(help="Seed of data order, eval split, random targets and weight noise."),
        options.dtype(help="Dtype of the saved model (auto: float32 on CPU, bfloat16 on GPU); 16-bit runs train float32 "
                           "master weights under 16-bit autocast."),
        options.device(UNLEARN_DEVICE, help="auto (accelerate's choice), cpu or cuda."),
        click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True,
                     help="accelerate mixed precision (autocast) for the forward passes (default: the 16-bit --dtype's)."),
        click.option("--train-dropout", is_flag=True,
                     help="Train with dropout on (default off: the model runs in eval mode, runs are deterministic)."),
        click.option("--forget-weight", type=float, default=1.0, show_default=True,
                     help="Weight of the forget term (open-unlearning's gamma): grad_diff retain NLL - w * forget NLL; "
                          "dpo / npo / simnpo w * preference term + retain NLL; cb / cb_lat rr: scales the rerouting "
                          "coefficient c_rr. Refused by the other methods, whose losses have no such weight."),
        click.option("--beta", type=float, default=0.1, show_default=True, help="dpo / npo / simnpo inverse temperature."),
        click.option("--layer-id", type=int, default=None,
                     help="rmu / cb / lat / cb_lat target layer (default 7 as in WMDP's RMU, or the last block)."),
        click.option("--target-layers", default=None,
                     help="Comma-separated target layers (default: just --layer-id): the block outputs scored by rmu / cb / "
                          "cb_lat (lat: where its original adversary sits, the middle one)."),
        click.option("--steering-coeff", type=float, default=20.0, show_default=True,
                     help="rmu / cb: norm c of the random target c * u (u = torch.rand normalised, as in WMDP)."),
        click.option("--alpha", type=float, default=100.0, show_default=True,
                     help="rmu / cb: retain weight; cb --cb-variant rr: the coefficient schedule's scale."),
        click.option("--update-roles", default=None,
                     help="Full-parameter: train only these parameter roles (e.g. down,up; rmu default: down, "
                          "WMDP's MLP down-projection), selected by name through the architecture adapter."),
        click.option("--update-layers", default=None,
                     help="Full-parameter: train only these layers (rmu default: layer_id-2..layer_id, WMDP's --layer_ids)."),
        click.option("--cb-variant", type=click.Choice(CB_VARIANTS), default="original", show_default=True,
                     help="cb / cb_lat: original (the original pipeline's -cos(h, c u) + alpha (1 - cos to frozen) "
                          "per target layer) or rr, representation rerouting: mean over target layers of "
                          "ReLU(cos(h, frozen h)) on forget + mean L2 to frozen on retain. cb rr = GraySwan "
                          "src/lorra_circuit_breaker.py compute_loss (retain over every block up to the last target; "
                          "c_rr=a(1-t/2T), c_retain=a t/2T, t from 1); cb_lat rr = deep ignorance "
                          "unlearn/reference/cas/unlearning.py RRTrainer (retain over every block; s=min(1,t/T), "
                          "c_rr=a(1-s/4), c_retain=a s)."),
        click.option("--rr-retain-mean", type=click.Choice(RR_RETAIN_MEANS), default="tokens", show_default=True,
                     help="cb / cb_lat --cb-variant rr: the retain anchor's mean. tokens: over the real tokens; padded: "
                          "GraySwan's / deep ignorance's nanmean over the retain batch padded to --max-length (the sum "
                          "over real tokens / (layers x batch x max-length): the token mean times the fill ratio)."),
        click.option("--adversary", type=click.Choice(ADVERSARIES), default=None,
                     help="lat / cb_lat adversary (default: lat pgd, cb_lat combined). pgd: the original pipeline's "
                          "PGD on one layer (--lat-norm); targeted: targeted LAT's per-token perturbation, AdamW, "
                          "clipped to the per-token L2 ball --lat-eps (latent_at/lat_methods.py "
                          "projected_gradient_descent); combined: deep ignorance's unbounded steering vector + "
                          "32-token soft prefix, AdamW, kept on for cb_lat's retain pass "
                          "(unlearn/reference/cas/unlearning.py gradient_descent_attack)."),
        click.option("--adversary-layers", default=None,
                     help="lat / cb_lat: comma-separated block outputs the adversary perturbs, -1 = the embedding "
                          "output (default: lat the middle target layer; cb_lat -1, deep ignorance's embedding "
                          "adversary). cb_lat requires them strictly before the first target layer."),
        click.option("--adversary-lr", type=float, default=None,
                     help="lat / cb_lat: AdamW learning rate of the targeted / combined adversary "
                          "(default 5e-2 targeted LAT, 2e-3 deep ignorance)."),
        click.option("--lat-eps", type=float, default=1.0, show_default=True,
                     help="lat / cb_lat: pgd / targeted adversary budget (targeted: per-token L2 radius)."),
        click.option("--lat-steps", type=int, default=5, show_default=True, help="lat / cb_lat: adversary steps per batch."),
        click.option("--lat-step-size", type=float, default=None,
                     help="lat / cb_lat: pgd step size (default 2.5 * eps / steps)."),
        click.option("--lat-norm", type=click.Choice(LAT_NORMS), default="linf", show_default=True,
                     help="lat / cb_lat --adversary pgd: linf (original sign step) or l2 (normalised-gradient "
                          "steps in a per-token L2 ball; targeted LAT itself is --adversary targeted)."),
        click.option("--lat-defender", type=click.Choice(LAT_DEFENDERS), default="ascent", show_default=True,
                     help="lat: ascent (original: -NLL(forget | adversary) + NLL(retain)) or away (targeted LAT "
                          "do_defense_step: --lat-toward-coef x retain NLL under the adversary + 1 x -log(1-p) on "
                          "forget under the adversary + --lat-sft-coef x retain NLL without it, normalised by their sum)."),
        click.option("--lat-toward-coef", type=float, default=1.0, show_default=True,
                     help="lat --lat-defender away: weight of the retain NLL under the adversary (targeted LAT's "
                          "defender 'toward' term on the retain text; WMDP notebook: toward 1)."),
        click.option("--lat-sft-coef", type=float, default=4.0, show_default=True,
                     help="lat --lat-defender away: weight of the retain NLL without the adversary (targeted LAT's "
                          "WMDP notebook: sft 4)."),
        click.option("--adversary-away-coef", type=float, default=0.0, show_default=True,
                     help="lat / cb_lat: weight of the adversary's away term, -log(1-p) on the retain text under the "
                          "attack, against its forget NLL weight 1, normalised (targeted LAT's adversary: toward 1, "
                          "away 1, the lat reference preset); 0: the adversary only lowers forget NLL."),
        click.option("--wt-noise-std", type=float, default=0.02, show_default=True,
                     help="wt_dist: std of the Gaussian noise added to every weight before retain fine-tuning."),
        click.option("--wt-reg-lambda", type=float, default=0.1, show_default=True,
                     help="wt_dist_reg: lambda in retain NLL - lambda * RMS(theta - theta_pretrained) (the official "
                          "code's size-independent distance)."),
        click.option("--wt-reg-eps", type=float, default=1e-12, show_default=True,
                     help="wt_dist_reg: eps inside the square root of the RMS distance (reference code: 1e-8)."),
        click.option("--lora", is_flag=True, help="Train LoRA adapters (PEFT) and save the merged model."),
        click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank."),
        click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="LoRA alpha."),
        click.option("--lora-targets", default=None,
                     help="Comma-separated module names to adapt, or a rule: all-linear (the default: every attention "
                          "and MLP linear of the family) or peft-default (PEFT's per-architecture default, as "
                          "LoraConfig(target_modules=None): query_key_value for GPT-NeoX, q_proj,v_proj for Llama, "
                          "c_attn for GPT-2; every linear where PEFT has none). config.json records the resolved names."),
        click.option("--lora-dropout", type=float, default=0.0, show_default=True, help="LoRA dropout."),
        click.option("--wandb", "use_wandb", is_flag=True,
                     help="Log to Weights & Biases (needs the wandb package and WANDB_API_KEY)."),
        click.option("--wandb-project", default="unlearn-lens", show_default=True, help="W&B project."),
        options.trust_remote_code(),
        options.overwrite(help="Redo a finished run in --outdir."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(flags):
        func = option(func)
    return func


#: click parameter name -> UnlearnConfig field, where they differ.
_FIELD = {"use_wandb": "wandb"}


def _explicit(kw: dict) -> set[str]:
    """The config fields whose flags were given on the command line (they override the preset)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set()
    given = set()
    for name in kw:
        source = ctx.get_parameter_source(name)
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT):
            given.add(_FIELD.get(name, name))
    return given


def _config(method: str, outdir: str, kw: dict) -> UnlearnConfig:
    """The run's config: every flag, then ``--preset``'s values for the flags not given explicitly."""
    cfg = _plain_config(method, outdir, kw)
    if method in METHODS:  # an unknown method is reported by validate()
        explicit = _explicit(kw) - {"preset"}
        cfg.apply_preset(explicit)
        if "forget_weight" in explicit and not reads_forget_weight(method, cfg.cb_variant):
            raise UserError(f"--forget-weight has no effect on {method} ({METHODS[method][1]}); it weighs the "
                            f"forget term of {', '.join(FORGET_WEIGHTED)}, and of "
                            f"{' / '.join(FORGET_WEIGHTED_RR)} with --cb-variant rr"
                            + ("; grad_diff is ga with that weight" if method == "ga" else ""))
    return cfg


def _plain_config(method: str, outdir: str, kw: dict) -> UnlearnConfig:
    return UnlearnConfig(preset=kw["preset"], warmup_epochs=kw["warmup_epochs"], wt_reg_eps=kw["wt_reg_eps"],
        model=kw["model"], data=kw["data"], outdir=outdir, method=method, revision=kw["revision"],
        max_length=kw["max_length"], batch_size=kw["batch_size"], grad_accum_steps=kw["grad_accum_steps"],
        steps=kw["steps"], epochs=kw["epochs"], stop_after=kw["stop_after"], max_samples=kw["max_samples"],
        eval_split=kw["eval_split"],
        eval_every=kw["eval_every"], eval_batch_size=kw["eval_batch_size"], optimizer=kw["optimizer"],
        lr=kw["lr"], weight_decay=kw["weight_decay"], momentum=kw["momentum"], lr_scheduler=kw["lr_scheduler"],
        warmup_steps=kw["warmup_steps"], grad_clip=kw["grad_clip"], seed=kw["seed"], dtype=kw["dtype"],
        device=kw["device"], mixed_precision=kw["mixed_precision"], train_dropout=kw["train_dropout"],
        forget_weight=kw["forget_weight"], beta=kw["beta"], layer_id=kw["layer_id"],
        target_layers=_ints(kw["target_layers"]), steering_coeff=kw["steering_coeff"], alpha=kw["alpha"],
        update_roles=_strs(kw["update_roles"]), update_layers=_ints(kw["update_layers"]),
        cb_variant=kw["cb_variant"], rr_retain_mean=kw["rr_retain_mean"], lat_eps=kw["lat_eps"],
        lat_steps=kw["lat_steps"],
        lat_step_size=kw["lat_step_size"], lat_norm=kw["lat_norm"], adversary=kw["adversary"],
        adversary_layers=_ints(kw["adversary_layers"]), adversary_lr=kw["adversary_lr"],
        lat_defender=kw["lat_defender"], lat_toward_coef=kw["lat_toward_coef"], lat_sft_coef=kw["lat_sft_coef"],
        adversary_away_coef=kw["adversary_away_coef"], wt_noise_std=kw["wt_noise_std"],
        wt_reg_lambda=kw["wt_reg_lambda"], lora=kw["lora"], lora_r=kw["lora_r"], lora_alpha=kw["lora_alpha"],
        lora_targets=_strs(kw["lora_targets"]), lora_dropout=kw["lora_dropout"], wandb=kw["use_wandb"],
        wandb_project=kw["wandb_project"], trust_remote_code=kw["trust_remote_code"], overwrite=kw["overwrite"],
    )


def _main_process() -> bool:
    """Whether this is rank 0 under ``accelerate launch`` / torchrun (or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def _echo_main(message: str) -> None:
    """Print once under ``accelerate launch`` / torchrun (rank 0 only)."""
    if _main_process():
        click.echo(message)


def _echo_effect(run: Path) -> None:
    """Print what the run did to each evaluated metric (after - before, paired, 95 % interval and n)."""
    from analyses.effects import change_lines

    path = run / UNLEARN_EVAL_JSON
    if not _main_process() or not path.is_file():  # rank 0 wrote it; a run without one has nothing to say
        return
    record = json.loads(path.read_text())
    for line in change_lines(record.get("before") or {}, record.get("after") or {}):
        click.echo(f"  {line}")


def _presets_epilog() -> str:
    """Every preset with what it sets and its source (``\b``: click keeps the lines as they are)."""
    return f"\b\nPresets (--preset; default {presets.DEFAULT_PRESET}):\n" + presets.describe()


@click.command("unlearn", epilog=_presets_epilog())
@click.option("--method", required=True, help=f"Unlearning method: {', '.join(METHODS)}.")
@_shared_options
def unlearn(method: str, outdir: str, no_progress: bool, **kw) -> None:
    """Unlearn the forget set from --model with one method (default --preset default: this tool's defaults); writes OUTDIR/model.

    Methods: ga_simple, ga, grad_diff, dpo, npo, simnpo (losses on logits), rmu, cb, lat,
    cb_lat (hidden states), wt_dist, wt_dist_reg (weight space; not with --lora). Runs unchanged
    under `accelerate launch` (docs/accelerate/). dpo builds its pairs from each forget text: the
    first half of its tokens is the prompt, the rest the dispreferred continuation, and a refusal
    ("I don't know"-style, a fixed list, seeded by --seed) the preferred one. 16-bit --dtype trains
    float32 master weights under autocast and saves the model at the requested dtype.
    """
    from unlearn_lens.unlearning.trainer import run_unlearning

    cfg = _config(method, outdir, kw)
    cfg.validate()
    path = run_unlearning(cfg, progress=not no_progress)
    _echo_main(f"{method}: unlearned model written to {path / 'model'}")
    _echo_effect(path)


@click.command("unlearn-all", epilog=_presets_epilog())
@click.option("--methods", default=",".join(METHODS), show_default=True,
              help="Comma-separated methods, each run into OUTDIR/<method>/ (finished ones are skipped).")
@_shared_options
def unlearn_all(methods: str, outdir: str, no_progress: bool, **kw) -> None:
    """Run several methods with the same settings (default --preset default: this tool's defaults) into OUTDIR/<method>/, skipping
    finished runs."""
    from unlearn_lens.unlearning.trainer import is_complete, run_unlearning

    names = _strs(methods) or []
    if not names:
        raise UserError("--methods is empty")
    configs = [_config(name, str(Path(outdir) / name), kw) for name in names]
    for cfg in configs:  # every method checked before the first one trains
        cfg.validate()
    for cfg in configs:
        if is_complete(cfg.outdir) and not cfg.overwrite:
            _echo_main(f"{cfg.method}: already finished in {cfg.outdir}, skipped")
            continue
        path = run_unlearning(cfg, progress=not no_progress)
        _echo_main(f"{cfg.method}: unlearned model written to {path / 'model'}")
        _echo_effect(path)
