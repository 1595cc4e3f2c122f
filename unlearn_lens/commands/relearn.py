"""`unlearn-lens relearn`: a fine-tuning attack on a few forget texts (and a retain control)."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.relearn import SCORINGS, RelearnSettings

_S = RelearnSettings  # the settings' defaults are the flags' defaults


@click.command("relearn")
@options.model_side(model_help="The modified model to attack: hub id, local HF directory or .gguf file.")
@click.option("--base-model", "base_spec", required=True,
              help="The base model the modified --model came from (evaluated once: the recovery target).")
@options.revision(name="--base-revision", of="--base-model")
@options.data()
@options.outdir()
@options.name()
@options.max_samples(help=options.MEASURED_SAMPLES_HELP)
@options.max_length()
@options.compute(batch_default=_S.batch_size, batch_help="Training texts per step.")
@options.eval_batch_size(help="Texts or prompts per forward pass when evaluating (as `eval --batch-size`).")
@click.option("--steps", type=int, default=_S.steps, show_default=True, help="Fine-tuning steps of each condition.")
@click.option("--lr", type=float, default=_S.lr, show_default=True, help="AdamW learning rate (constant).")
@click.option("--lora", is_flag=True,
              help="Fine-tune LoRA adapters (PEFT, every attention and MLP linear) instead of all weights.")
@click.option("--lora-r", type=int, default=_S.lora_r, show_default=True, help="LoRA rank (with --lora).")
@click.option("--lora-alpha", type=float, default=_S.lora_alpha, show_default=True, help="LoRA alpha (with --lora).")
@click.option("--eval-every", type=int, default=_S.eval_every, show_default=True,
              help="Evaluate every K steps (step 0 and the last step always).")
@click.option("--forget-subset", type=int, default=_S.forget_subset, show_default=True,
              help="Attack texts drawn from forget.txt's unmeasured half (all of it when smaller).")
@options.seed(help="Seed of the subset, data order and LoRA init.")
@click.option("--control/--no-control", default=_S.control, show_default=True,
              help="Also fine-tune on retain-only text (same size, steps and LR) as a control.")
@click.option("--scoring", type=click.Choice(list(SCORINGS)), default=_S.scoring, show_default=True,
              help="Accuracy scoring of the headline steps-to-half-recovery (both are reported).")
@options.overwrite()
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def relearn(model_spec, revision, trust_remote_code, base_spec, base_revision, data_dir, outdir, name, max_samples,
            max_length, device, dtype, batch_size, eval_batch_size, steps, lr, lora, lora_r, lora_alpha, eval_every,
            forget_subset, seed, control, scoring, overwrite, no_progress) -> None:
    """Fine-tuning attack: how fast does plain NLL descent on a few forget texts undo the unlearning?

    Writes OUT/<name>/relearning/recovery_curve.csv (condition, step, forget_nll, retain_nll,
    letter_accuracy, cloze_accuracy), recovery_curve.png and summary.json with the steps needed to
    recover half of the accuracy and forget-NLL gaps to --base-model. Step 0 is the model's own
    evaluation (`unlearn-lens eval` with the same --max-samples, --max-length and batch size).
    """
    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.relearn import RelearnSettings, run_relearn

    folder = run_relearn(RelearnSettings(
        model=ModelRef(model_spec, revision, trust_remote_code=trust_remote_code),
        base=ModelRef(base_spec, base_revision, trust_remote_code=trust_remote_code), data=data_dir, outdir=outdir,
        name=name, compute=Compute(device, dtype, eval_batch_size), steps=steps, lr=lr, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, eval_every=eval_every, batch_size=batch_size, max_length=max_length,
        max_samples=max_samples, forget_subset=forget_subset, seed=seed, control=control, scoring=scoring,
        overwrite=overwrite, progress=not no_progress))
    click.echo(f"relearning results in {folder}")
