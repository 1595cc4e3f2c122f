"""`unlearn-lens lipschitz`: local Lipschitz, input-gradient norm and output variance of two models."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.lipschitz import DEFAULT_EPS_TEXT, LipschitzSettings, parse_eps

_S = LipschitzSettings  # the settings' defaults are the flags' defaults


@click.command("lipschitz")
@options.model_pair(modified_help="Modified (unlearned / filtered) model, same tokenizer as --model-a.",
                    revision_alias=True)
@click.option("--name-a", default=_S.name_a, show_default=True, help="Name of the base model in outputs.")
@click.option("--name-b", default=None,
              help="Name of the modified model in outputs (OUT/<name-a>__to__<name-b>/); default: derived from "
                   "--model-b's path as eval names a model (its last component; the parent's for .../model).")
@options.data(help="Data directory with forget.txt and retain.txt (`unlearn-lens datasets create`).")
@options.outdir(help="Output root; results go to OUT/<name-a>__to__<name-b>/lipschitzness/.")
@click.option("--eps", "eps_text", default=DEFAULT_EPS_TEXT, show_default=True,
              help="Comma-separated perturbation radii, relative: each real token's embedding moves by "
                   "eps x its own L2 norm along a random direction.")
@click.option("--n-perturb", type=int, default=_S.n_perturb, show_default=True,
              help="Random perturbation draws per text and eps (at least 2).")
@options.max_samples(_S.max_samples, help="Texts per split (the first N).")
@options.max_length(_S.max_length)
@options.compute(dtype_default=_S.compute.dtype,
                 dtype_help="Model dtype; half precision swamps small eps, so float32 is the default.",
                 batch_help="Texts per forward pass.")
@options.seed(help="Seed of the perturbation directions (the same draws for both models).")
@options.arch_spec()
@options.trust_remote_code()
@options.overwrite()
def lipschitz(model_a: str, revision_a: str | None, model_b: str, revision_b: str | None, name_a: str,
              name_b: str | None, data_dir: str, outdir: str, eps_text: str, n_perturb: int, max_samples: int,
              max_length: int, device: str, dtype: str, batch_size: int, seed: int, arch_spec: str | None,
              trust_remote_code: bool, overwrite: bool) -> None:
    """Local Lipschitz estimates, input-gradient norms and output variance, forget vs retain."""
    from unlearn_lens.core.settings import Compute, ModelRef
    from unlearn_lens.lipschitz import LipschitzSettings, run_lipschitz

    folder = run_lipschitz(LipschitzSettings(
        model_a=ModelRef(model_a, revision_a, arch_spec, trust_remote_code),
        model_b=ModelRef(model_b, revision_b, arch_spec, trust_remote_code), data=data_dir, outdir=outdir,
        name_a=name_a, name_b=name_b, eps_values=tuple(parse_eps(eps_text)), n_perturb=n_perturb,
        max_samples=max_samples, max_length=max_length, compute=Compute(device, dtype, batch_size), seed=seed,
        overwrite=overwrite))
    click.echo(f"lipschitz results in {folder}")
