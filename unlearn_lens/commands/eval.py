"""`unlearn-lens eval`: one model's own evaluation (WMDP accuracy, forget NLL, retain perplexity)."""

from __future__ import annotations

import click

from unlearn_lens import options


@click.command("eval")
@options.model_side(model_help="Model to evaluate: hub id, local HF directory or .gguf file.")
@options.data()
@options.outdir()
@options.name()
@options.max_samples(help=options.MEASURED_SAMPLES_HELP)
@options.max_length()
@options.compute()
@options.overwrite()
def eval_command(model_spec, revision, trust_remote_code, data_dir, outdir, name, max_samples, max_length, device,
                 dtype, batch_size, overwrite) -> None:
    """Zero-shot WMDP accuracy (letter and cloze scoring), forget NLL and retain perplexity of one model.

    Writes OUT/<name>/evaluation/eval_results.csv (one row per metric: metric,value),
    summary.json and the completion marker. The prompts are the lenses' (no chat template), so
    this agrees with the logit lens at the last layer. On a planted-facts testbed it also reads
    forget_value_nll, the forget NLL of the facts' value tokens alone. Warns when evaluation
    questions appear in forget.txt.
    """
    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.eval_run import EvalSettings, run_eval

    folder = run_eval(EvalSettings(
        model=ModelRef(model_spec, revision, trust_remote_code=trust_remote_code), data=data_dir, outdir=outdir,
        name=name, compute=Compute(device, dtype, batch_size), max_samples=max_samples, max_length=max_length,
        overwrite=overwrite))
    click.echo(f"evaluation results in {folder}")
