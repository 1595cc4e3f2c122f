"""``unlearn-lens params`` as ``run(settings)``: the parameter diagnostics of one base -> modified pair.

The command and the pipeline build ``ParamsSettings`` and call ``run_params_step``;
``analyses.weights.params.run_params`` does the work.
"""

from __future__ import annotations

from dataclasses import dataclass

from analyses.weights.params import STEPS as PARAMS_STEPS
from unlearn_lens.core.settings import DEFAULT_SEED, ModelRef

#: Matrices sampled for the null-space / subspace analysis, and the subspace dimension compared.
DEFAULT_NUM_MATRICES = 50
DEFAULT_SUBSPACE_K = 10

@dataclass(frozen=True)
class ParamsSettings:
    """Everything ``run_params_step`` needs (the `params` command's flags)."""

    model_a: ModelRef  # the base model (spec, revision)
    model_b: ModelRef  # the modified model, same architecture
    outdir: str  # param_stats/, param_plots/, mlp_attn_analysis/, null_space_analysis/, mlp_nullspace/
    empirical_rank: bool = False
    num_matrices: int = DEFAULT_NUM_MATRICES
    subspace_k: int = DEFAULT_SUBSPACE_K
    rank_rtol: float | None = None
    workers: int = 1
    seed: int = DEFAULT_SEED
    steps: tuple[str, ...] = PARAMS_STEPS
    force: bool = False


def run_params_step(settings: ParamsSettings) -> dict:
    """Run ``analyses.weights.params.run_params`` with these settings; returns its result."""
    from analyses.weights.params import run_params

    s = settings
    return run_params(s.model_a.spec, s.model_b.spec, s.outdir, empirical_rank=s.empirical_rank,
                      num_matrices=s.num_matrices, workers=s.workers, seed=s.seed, revision_a=s.model_a.revision,
                      revision_b=s.model_b.revision, steps=list(s.steps), subspace_k=s.subspace_k,
                      rank_rtol=s.rank_rtol, force=s.force)
