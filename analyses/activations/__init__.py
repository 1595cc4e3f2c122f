"""Activation space: diagnostics computed from the activation caches, with no forward pass.

``caches`` opens the caches and ``inputs`` checks them; ``reductions`` holds the lazy dask
reductions; ``norms``, ``separation``, ``covariance``, ``row_space``, ``probes`` and ``logit_lens``
turn them into rows; ``runner`` (``unlearn-lens analyze``) orchestrates one pass over the caches
with ``execution``, ``lens_step`` and ``writers``; ``attack_directions`` derives the directions the
ablation attack removes.
"""
