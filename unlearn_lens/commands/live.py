"""`unlearn-lens lipschitz` and `unlearn-lens tuned-lens`: the diagnostics that run the model."""

from __future__ import annotations

import click

from unlearn_lens.core.errors import UserError


def parse_eps(text: str) -> list[float]:
    """``"1e-3,1e-2"`` -> ``[0.001, 0.01]``; a clear error for anything else."""
    values = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise UserError(f"--eps: {part.strip()!r} is not a number (give e.g. 1e-3,1e-2)") from None
    return values


_DEVICE_HELP = "Torch device to run on (cpu, cuda, cuda:1, mps)."
_ARCH_HELP = "JSON architecture description for a model outside the known families."
_TRC_HELP = "Allow the model's own code to run (off by default)."


@click.command("lipschitz")
@click.option("--model-a", required=True, help="Base model: hub id, local HF directory or .gguf file.")
@click.option("--revision-a", "--revision", "revision_a", default=None,
              help="Hub revision (branch, tag or commit) of --model-a (--revision is an alias).")
@click.option("--model-b", required=True, help="Modified (unlearned / filtered) model, same tokenizer as --model-a.")
@click.option("--revision-b", default=None, help="Hub revision of --model-b.")
@click.option("--name-a", default="base", show_default=True, help="Name of the base model in outputs.")
@click.option("--name-b", default=None,
              help="Name of the modified model in outputs (OUT/<name-a>__to__<name-b>/); default: derived from "
                   "--model-b's path as eval names a model (its last component; the parent's for .../model).")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Data directory with forget.txt and retain.txt (`unlearn-lens datasets create`).")
@click.option("--outdir", required=True, type=click.Path(file_okay=False),
              help="Output root; results go to OUT/<name-a>__to__<name-b>/lipschitzness/.")
@click.option("--eps", "eps_text", default="1e-3,1e-2", show_default=True,
              help="Comma-separated perturbation radii, relative: each real token's embedding moves by "
                   "eps x its own L2 norm along a random direction.")
@click.option("--n-perturb", type=int, default=8, show_default=True,
              help="Random perturbation draws per text and eps (at least 2).")
@click.option("--max-samples", type=int, default=64, show_default=True, help="Texts per split (the first N).")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per text (truncated).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Texts per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the perturbation directions (the same draws for both models).")
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Model dtype; half precision swamps small eps, so float32 is the default.")
@click.option("--arch-spec", default=None, type=click.Path(dir_okay=False), help=_ARCH_HELP)
@click.option("--trust-remote-code", is_flag=True, help=_TRC_HELP)
@click.option("--overwrite", is_flag=True, help="Recompute even if the output folder is complete.")
def lipschitz(model_a: str, revision_a: str | None, model_b: str, revision_b: str | None, name_a: str, name_b: str | None, data_dir: str, outdir: str, eps_text: str,
              n_perturb: int, max_samples: int, max_length: int, batch_size: int, seed: int, device: str,
              dtype: str, arch_spec: str | None, trust_remote_code: bool, overwrite: bool) -> None:
    """Local Lipschitz estimates, input-gradient norms and output variance, forget vs retain (step 12)."""
    from unlearn_lens.lipschitz import run_lipschitz
    from unlearn_lens.core.outputs import default_name

    name_b = name_b or default_name(model_b)
    folder = run_lipschitz(model_a, model_b, name_a=name_a, name_b=name_b, data_dir=data_dir, outdir=outdir,
                           eps_values=parse_eps(eps_text), n_perturb=n_perturb, max_samples=max_samples,
                           max_length=max_length, batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                           revision_a=revision_a, revision_b=revision_b, arch_spec=arch_spec,
                           trust_remote_code=trust_remote_code, overwrite=overwrite)
    click.echo(f"lipschitz results in {folder}")


@click.command("tuned-lens")
@click.option("--model", "model_spec", required=True, help="Hub id, local HF directory or .gguf file.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model.")
@click.option("--name", default=None,
              help="Name of the model in outputs (OUT/<name>/wmdp_tuned_lens/); default: derived from --model's "
                   "path as eval names a model (its last component; the parent's for .../model).")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Data directory (training texts and wmdp_mcq.jsonl).")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Output root.")
@click.option("--train-split", default="retain", show_default=True, type=click.Choice(["retain", "forget"]),
              help="Text the translators are trained on.")
@click.option("--steps", type=int, default=250, show_default=True,
              help="Optimizer steps (0 keeps identity translators: the logit lens).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--tokens-per-step", type=int, default=512, show_default=True,
              help="Random training tokens per optimizer step.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Texts per forward pass.")
@click.option("--max-samples", type=int, default=256, show_default=True, help="Training texts (the first N).")
@click.option("--max-length", type=int, default=128, show_default=True,
              help="Tokens per text (training texts are cut on the right, WMDP prompts on the left).")
@click.option("--cache", default=None,
              help="Activation cache of this model (`unlearn-lens capture`): train and score from its "
                   "residuals instead of running the model (splits it lacks are computed by the model).")
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Model dtype (translators always train in float32).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training minibatches.")
@click.option("--arch-spec", default=None, type=click.Path(dir_okay=False), help=_ARCH_HELP)
@click.option("--trust-remote-code", is_flag=True, help=_TRC_HELP)
@click.option("--overwrite", is_flag=True, help="Recompute even if the output folder is complete.")
def tuned_lens(model_spec: str, revision: str | None, name: str | None, data_dir: str, outdir: str, train_split: str, steps: int, lr: float,
               tokens_per_step: int, batch_size: int, max_samples: int, max_length: int, cache: str | None,
               device: str, dtype: str, seed: int, arch_spec: str | None, trust_remote_code: bool,
               overwrite: bool) -> None:
    """Train per-layer affine translators (tuned lens) and report WMDP accuracy per layer (step 14)."""
    from unlearn_lens.core.outputs import default_name
    from unlearn_lens.tuned_lens import run_tuned_lens

    name = name or default_name(model_spec)
    folder = run_tuned_lens(model_spec, name=name, data_dir=data_dir, outdir=outdir, train_split=train_split,
                            steps=steps, lr=lr, tokens_per_step=tokens_per_step, batch_size=batch_size,
                            max_samples=max_samples, max_length=max_length, cache=cache, device=device,
                            dtype=dtype, seed=seed, revision=revision, arch_spec=arch_spec,
                            trust_remote_code=trust_remote_code, overwrite=overwrite)
    click.echo(f"tuned lens results in {folder}")
