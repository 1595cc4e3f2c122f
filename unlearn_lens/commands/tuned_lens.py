"""`unlearn-lens tuned-lens`: train per-layer translators and read WMDP accuracy per layer."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.tuned_lens import TunedLensSettings

_S = TunedLensSettings  # the settings' defaults are the flags' defaults


@click.command("tuned-lens")
@options.model_side(with_arch_spec=True)
@options.name(help="Name of the model in outputs (OUT/<name>/wmdp_tuned_lens/); default: derived from --model's "
                   "path as eval names a model (its last component; the parent's for .../model).")
@options.data(help="Data directory (training texts and wmdp_mcq.jsonl).")
@options.outdir()
@click.option("--train-split", default=_S.train_split, show_default=True, type=click.Choice(["retain", "forget"]),
              help="Text the translators are trained on.")
@click.option("--steps", type=int, default=_S.steps, show_default=True,
              help="Optimizer steps (0 keeps identity translators: the logit lens).")
@click.option("--lr", type=float, default=_S.lr, show_default=True, help="Adam learning rate.")
@click.option("--tokens-per-step", type=int, default=_S.tokens_per_step, show_default=True,
              help="Random training tokens per optimizer step.")
@options.max_samples(_S.max_samples, help="Training texts (the first N).")
@options.max_length(_S.max_length,
                    help="Tokens per text (training texts are cut on the right, WMDP prompts on the left).")
@click.option("--cache", default=None,
              help="Activation cache of this model (`unlearn-lens capture`): train and score from its "
                   "residuals instead of running the model (splits it lacks are computed by the model).")
@options.compute(dtype_help="Model dtype (translators always train in float32).", batch_help="Texts per forward pass.")
@options.seed(help="Seed of the training minibatches.")
@options.overwrite()
def tuned_lens(model_spec: str, revision: str | None, arch_spec: str | None, trust_remote_code: bool,
               name: str | None, data_dir: str, outdir: str, train_split: str, steps: int, lr: float,
               tokens_per_step: int, max_samples: int, max_length: int, cache: str | None, device: str, dtype: str,
               batch_size: int, seed: int, overwrite: bool) -> None:
    """Train per-layer affine translators (tuned lens) and report WMDP accuracy per layer."""
    from unlearn_lens.core.outputs import default_name
    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.tuned_lens import run_tuned_lens

    folder = run_tuned_lens(TunedLensSettings(
        model=ModelRef(model_spec, revision, arch_spec, trust_remote_code), name=name or default_name(model_spec),
        data=data_dir, outdir=outdir, compute=Compute(device, dtype, batch_size), train_split=train_split,
        steps=steps, lr=lr, tokens_per_step=tokens_per_step, max_samples=max_samples, max_length=max_length,
        cache=cache, seed=seed, overwrite=overwrite))
    click.echo(f"tuned lens results in {folder}")
