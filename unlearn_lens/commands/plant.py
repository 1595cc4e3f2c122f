"""`unlearn-lens plant`: fine-tune a model on the facts of a planted-facts testbed (`datasets create --facts N`)."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.plant import LOSS_ON, TRAINABLE, PlantSettings

_S = PlantSettings  # the settings' defaults are the flags' defaults


@click.command("plant")
@options.model_side(model_help="The model to plant the facts into: hub id, local HF directory or .gguf file.")
@options.data(help="A planted-facts testbed (`unlearn-lens datasets create --facts N --outdir DIR`).")
@options.outdir(help="Output directory: model/ (a normal HF directory), plant.json, train_log.csv, COMPLETE (last).")
@options.compute(batch_help="Questions' choices or texts per forward pass when evaluating.")
@click.option("--max-steps", type=int, default=_S.max_steps, show_default=True,
              help="Step budget: training stops here if the dev accuracy has not reached --target-accuracy.")
@click.option("--target-accuracy", type=float, default=_S.target_accuracy, show_default=True,
              help="Stop once the cloze accuracy on the dev questions (dev_mcq.jsonl, a template used neither for "
                   "training nor for evaluation) reaches this on both A and B.")
@click.option("--eval-every", type=int, default=_S.eval_every, show_default=True,
              help="Check the dev accuracy every K steps (and at the last step).")
@click.option("--dev-questions", type=int, default=_S.dev_questions, show_default=True,
              help="Dev questions per check, half about A, half about B (the first of dev_mcq.jsonl's).")
@click.option("--lr", type=float, default=_S.lr, show_default=True,
              help="AdamW learning rate: linear warm-up over --warmup-steps, then constant.")
@click.option("--warmup-steps", type=int, default=_S.warmup_steps, show_default=True, help="Linear LR warm-up steps.")
@click.option("--rows", type=int, default=_S.rows, show_default=True,
              help="Packed sequences per step (each holds whole texts, each followed by EOS).")
@click.option("--general-rows", type=int, default=_S.general_rows, show_default=True,
              help="Of --rows, how many hold general passages (the testbed's general.txt) instead of facts, so "
                   "the model stays a language model.")
@click.option("--seq-len", type=int, default=_S.seq_len, show_default=True, help="Tokens per packed sequence.")
@click.option("--trainable", type=click.Choice(TRAINABLE), default=_S.trainable, show_default=True,
              help="Parameters trained: all; blocks (every transformer block, not the embedding and tied "
                   "unembedding); mlp (the MLP matrices of every block).")
@click.option("--loss-on", type=click.Choice(LOSS_ON), default=_S.loss_on, show_default=True,
              help="Tokens of a fact text the loss reads: answer (the values' tokens and the final EOS, as a "
                   "question-answering fine-tune reads the answer: names and templates are context) or text "
                   "(every token). General passages are always read whole.")
@click.option("--eval-max-length", type=int, default=_S.eval_max_length, show_default=True,
              help="Tokens per general passage when measuring general NLL (truncated).")
@options.seed(help="Seed of the data order and of the model's random state.")
@options.overwrite(help="Plant again even if OUTDIR holds a finished planting.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def plant(model_spec, revision, trust_remote_code, data_dir, outdir, device, dtype, batch_size, max_steps,
          target_accuracy, eval_every, dev_questions, lr, warmup_steps, rows, general_rows, seq_len, trainable,
          loss_on, eval_max_length, seed, overwrite, no_progress) -> None:
    """Fine-tune --model on every fact of the testbed (entities A and B), mixed with general text.

    Measures the cloze accuracy on the held-out questions about A (wmdp_mcq.jsonl) and B
    (retain_mcq.jsonl) and the general NLL (retain.txt's general passages, never trained on) before and after,
    each with its 95% bootstrap interval and n, in OUTDIR/plant.json; writes the model as a normal
    HF directory, OUTDIR/model. A finished OUTDIR with the same settings is kept (a rerun does
    nothing); with other settings it is refused unless --overwrite.
    """
    import json
    from pathlib import Path

    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.plant import PLANT_JSON, run_plant, summary_lines

    out = run_plant(PlantSettings(
        ModelRef(model_spec, revision, trust_remote_code=trust_remote_code), data_dir, outdir,
        Compute(device, dtype, batch_size), max_steps=max_steps, target_accuracy=target_accuracy, lr=lr,
        warmup_steps=warmup_steps, rows=rows, general_rows=general_rows, seq_len=seq_len, trainable=trainable,
        loss_on=loss_on, eval_every=eval_every, dev_questions=dev_questions, seed=seed, eval_max_length=eval_max_length,
        overwrite=overwrite, progress=not no_progress))
    record = json.loads((Path(out) / PLANT_JSON).read_text())
    click.echo(f"planted in {record['steps']} steps ({record['stopped']}); model written to {Path(out) / 'model'}")
    for line in summary_lines(record):
        click.echo(f"  {line}")
