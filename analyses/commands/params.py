"""``unlearn-lens params``: parameter-space diagnostics of dW = W_b - W_a, read from checkpoints (no torch)."""

from __future__ import annotations

import json

import click

STEP_CHOICES = ("stats", "mlp_attn", "null_space", "mlp_nullspace")


@click.command("params")
@click.option("--model-a", required=True, metavar="BASE",
              help="Base model: hub id, local HF directory (safetensors, sharded or not) or .gguf file.")
@click.option("--model-b", required=True, metavar="MODIFIED",
              help="Modified (unlearned / filtered) model, same architecture as --model-a.")
@click.option("--outdir", required=True, type=click.Path(file_okay=False),
              help="Output root: param_stats/ (with quantization_flips.csv), param_plots/, mlp_attn_analysis/, "
                   "null_space_analysis/, mlp_nullspace/.")
@click.option("--revision-a", default=None, help="Hub revision (branch, tag or commit) of --model-a.")
@click.option("--revision-b", default=None, help="Hub revision (branch, tag or commit) of --model-b.")
@click.option("--empirical-rank", is_flag=True,
              help="Also compute the 99%-energy empirical rank of the base weights W (slower: near-full-rank "
                   "matrices need every singular value). dW's empirical rank is always computed (Lanczos for "
                   "low-rank updates; 0 without work for unchanged matrices).")
@click.option("--num-matrices", type=click.IntRange(min=0), default=50, show_default=True,
              help="Matrices sampled (fixed seed) for the null-space / subspace analysis (step 7), among the "
                   "matrices the intervention changed (all of them when fewer).")
@click.option("--subspace-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Dimension k of the top singular subspaces of W_a and W_b compared in step 7.")
@click.option("--rank-rtol", type=float, default=None,
              help="Step 10: singular values of W above RTOL * sigma_1(W) count towards its rank "
                   "(default: max(shape) * float32 eps, numpy's matrix_rank rule).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes; each reads and analyses its own matrices.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the step-7 matrix sample.")
@click.option("--steps", default=",".join(STEP_CHOICES), show_default=True,
              help="Comma-separated steps to run: stats (param_stats + param_plots), mlp_attn, null_space, mlp_nullspace.")
@click.option("--force", is_flag=True, help="Recompute folders already marked complete with the same options.")
def params(model_a: str, model_b: str, outdir: str, revision_a: str | None, revision_b: str | None,
           empirical_rank: bool, num_matrices: int, subspace_k: int, rank_rtol: float | None, workers: int,
           seed: int, steps: str, force: bool) -> None:
    """Treat the intervention as a matrix perturbation: how big, where, how low-rank, how aligned.

    Reads both checkpoints one matrix at a time, so two 7B models fit on a laptop.
    """
    from analyses.weights.params import run_params

    chosen = [s.strip() for s in steps.split(",") if s.strip()]
    result = run_params(model_a, model_b, outdir, empirical_rank=empirical_rank, num_matrices=num_matrices,
                        workers=workers, seed=seed, revision_a=revision_a, revision_b=revision_b,
                        steps=chosen, subspace_k=subspace_k, rank_rtol=rank_rtol, force=force)
    if result.get("skipped"):
        click.echo(f"{outdir}: already complete with these options (use --force to recompute)")
        return
    keys = ("num_matrices", "total_dW_fro_rel", "mlp_energy_share", "attn_energy_share",
            "median_dW_stable_rank", "top_changed_layers")
    click.echo(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
    click.echo(f"wrote {', '.join(result['steps'])} under {outdir} in {result['seconds']:.1f} s")
