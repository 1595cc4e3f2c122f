"""`unlearn-lens eval` and `unlearn-lens relearn`: a model's own evaluation and a relearning attack."""

from __future__ import annotations

import click

_DTYPES = click.Choice(["auto", "float32", "float16", "bfloat16"])


def _common_options(func):
    options = [
        click.option("--model", "model_spec", required=True,
                     help="Model to evaluate (relearn: the modified model to attack): hub id, local HF directory "
                          "or .gguf file."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model."),
        click.option("--data", "data_dir", required=True, type=click.Path(),
                     help="Data directory with forget.txt, retain.txt, wmdp_mcq.jsonl "
                          "(`unlearn-lens datasets create`)."),
        click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Output root."),
        click.option("--name", default=None,
                     help="Name of the model in outputs (default: derived from --model's path: its last "
                          "component; the parent's for .../model)."),
        click.option("--max-samples", type=int, default=None,
                     help="At most this many measured forget texts, retain texts and questions (default: all)."),
        click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per text (truncated)."),
        click.option("--device", default="cpu", show_default=True, help="Torch device (cpu, cuda, cuda:1, mps)."),
        click.option("--dtype", default="auto", show_default=True, type=_DTYPES,
                     help="Model dtype (auto: float32 on CPU, bfloat16 on GPU)."),
        click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (off by default)."),
        click.option("--overwrite", is_flag=True, help="Recompute even if the output folder is complete."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("eval")
@_common_options
@click.option("--batch-size", type=int, default=8, show_default=True, help="Texts or prompts per forward pass.")
def eval_command(model_spec, revision, data_dir, outdir, name, max_samples, max_length, device, dtype,
                 trust_remote_code, overwrite, batch_size) -> None:
    """Zero-shot WMDP accuracy (letter and cloze scoring), forget NLL and retain perplexity of one model.

    Writes OUT/<name>/evaluation/eval_results.csv (one row per metric: metric,value),
    summary.json and the completion marker. The prompts are the lenses' (no chat template), so
    this agrees with the logit lens at the last layer. Warns when evaluation questions appear in
    forget.txt.
    """
    from unlearn_lens.relearn import run_eval

    folder = run_eval(model_spec, data_dir=data_dir, outdir=outdir, name=name, max_samples=max_samples,
                      max_length=max_length, batch_size=batch_size, device=device, dtype=dtype, revision=revision,
                      trust_remote_code=trust_remote_code, overwrite=overwrite)
    click.echo(f"evaluation results in {folder}")


@click.command("relearn")
@_common_options
@click.option("--base-model", "base_spec", required=True,
              help="The base model the modified --model came from (evaluated once: the recovery target).")
@click.option("--base-revision", default=None, help="Hub revision of --base-model.")
@click.option("--steps", type=int, default=50, show_default=True, help="Fine-tuning steps of each condition.")
@click.option("--lr", type=float, default=1e-5, show_default=True, help="AdamW learning rate (constant).")
@click.option("--lora", is_flag=True,
              help="Fine-tune LoRA adapters (PEFT, every attention and MLP linear) instead of all weights.")
@click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank (with --lora).")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (with --lora).")
@click.option("--eval-every", type=int, default=10, show_default=True,
              help="Evaluate every K steps (step 0 and the last step always).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Training texts per step.")
@click.option("--eval-batch-size", type=int, default=8, show_default=True,
              help="Texts or prompts per forward pass when evaluating (as `eval --batch-size`).")
@click.option("--forget-subset", type=int, default=64, show_default=True,
              help="Attack texts drawn from forget.txt's unmeasured half (all of it when smaller).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset, data order and LoRA init.")
@click.option("--control/--no-control", default=True, show_default=True,
              help="Also fine-tune on retain-only text (same size, steps and LR) as a control.")
@click.option("--scoring", type=click.Choice(["cloze", "letter"]), default="cloze", show_default=True,
              help="Accuracy scoring of the headline steps-to-half-recovery (both are reported).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def relearn(model_spec, revision, data_dir, outdir, name, max_samples, max_length, device, dtype, trust_remote_code,
            overwrite, base_spec, base_revision, steps, lr, lora, lora_r, lora_alpha, eval_every, batch_size,
            eval_batch_size, forget_subset, seed, control, scoring, no_progress) -> None:
    """Fine-tuning attack: how fast does plain NLL descent on a few forget texts undo the unlearning?

    Writes OUT/<name>/relearning/recovery_curve.csv (condition, step, forget_nll, retain_nll,
    letter_accuracy, cloze_accuracy), recovery_curve.png and summary.json with the steps needed to
    recover half of the accuracy and forget-NLL gaps to --base-model. Step 0 is the model's own
    evaluation (`unlearn-lens eval` with the same --max-samples, --max-length and batch size).
    """
    from unlearn_lens.relearn import run_relearn

    folder = run_relearn(model_spec, base_spec, data_dir=data_dir, outdir=outdir, name=name, steps=steps, lr=lr,
                         lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, eval_every=eval_every,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, max_length=max_length,
                         max_samples=max_samples, forget_subset=forget_subset, seed=seed, device=device, dtype=dtype,
                         control=control, scoring=scoring, revision=revision, base_revision=base_revision,
                         trust_remote_code=trust_remote_code, overwrite=overwrite, progress=not no_progress)
    click.echo(f"relearning results in {folder}")
