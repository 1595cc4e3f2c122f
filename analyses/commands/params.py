"""``unlearn-lens params``: parameter-space diagnostics of dW = W_b - W_a, read from checkpoints (no torch)."""

from __future__ import annotations

import json

import click

from analyses.weights.params_step import DEFAULT_NUM_MATRICES, DEFAULT_SUBSPACE_K, PARAMS_STEPS
from unlearn_lens import options


@click.command("params")
@options.model_pair(base_help="Base model: hub id, local HF directory (safetensors, sharded or not) or .gguf file.")
@options.outdir(help="Output root: param_stats/ (with quantization_flips.csv), param_plots/, mlp_attn_analysis/, "
                     "null_space_analysis/, mlp_nullspace/.")
@click.option("--empirical-rank", is_flag=True,
              help="Also compute the 99%-energy empirical rank of the base weights W (slower: near-full-rank "
                   "matrices need every singular value). dW's empirical rank is always computed (Lanczos for "
                   "low-rank updates; 0 without work for unchanged matrices).")
@click.option("--num-matrices", type=click.IntRange(min=0), default=DEFAULT_NUM_MATRICES, show_default=True,
              help="Matrices sampled (fixed seed) for the null-space / subspace analysis (null_space), among the "
                   "matrices the intervention changed (all of them when fewer).")
@click.option("--subspace-k", type=click.IntRange(min=1), default=DEFAULT_SUBSPACE_K, show_default=True,
              help="Dimension k of the top singular subspaces of W_a and W_b compared by null_space.")
@click.option("--rank-rtol", type=float, default=None,
              help="mlp_nullspace: singular values of W above RTOL * sigma_1(W) count towards its rank "
                   "(default: max(shape) * float32 eps, numpy's matrix_rank rule).")
@options.workers(1, help="Worker processes; each reads and analyses its own matrices.")
@options.seed(help="Seed of the null_space matrix sample.")
@click.option("--steps", default=",".join(PARAMS_STEPS), show_default=True,
              help="Comma-separated steps to run: stats (param_stats + param_plots), mlp_attn, null_space, mlp_nullspace.")
@options.force(help="Recompute folders already marked complete with the same options.")
def params(model_a: str, revision_a: str | None, model_b: str, revision_b: str | None, outdir: str,
           empirical_rank: bool, num_matrices: int, subspace_k: int, rank_rtol: float | None, workers: int,
           seed: int, steps: str, force: bool) -> None:
    """Treat the intervention as a matrix perturbation: how big, where, how low-rank, how aligned.

    Reads both checkpoints one matrix at a time, so two 7B models fit on a laptop.
    """
    from analyses.weights.params_step import ParamsSettings, run_params_step
    from unlearn_lens.core.settings import ModelRef

    chosen = tuple(s.strip() for s in steps.split(",") if s.strip())
    result = run_params_step(ParamsSettings(
        model_a=ModelRef(model_a, revision_a), model_b=ModelRef(model_b, revision_b), outdir=outdir,
        empirical_rank=empirical_rank, num_matrices=num_matrices, subspace_k=subspace_k, rank_rtol=rank_rtol,
        workers=workers, seed=seed, steps=chosen, force=force))
    if result.get("skipped"):
        click.echo(f"{outdir}: already complete with these options (use --force to recompute)")
        return
    keys = ("num_matrices", "total_dW_fro_rel", "mlp_energy_share", "attn_energy_share",
            "median_dW_stable_rank", "top_changed_layers")
    click.echo(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
    click.echo(f"wrote {', '.join(result['steps'])} under {outdir} in {result['seconds']:.1f} s")
