"""Diagnostics that read caches and checkpoints; never imports torch, transformers or nnsight.

Two halves: ``analyses.weights`` (parameter space, from checkpoints) and ``analyses.activations``
(activation space, from the caches); the shared writers, plots, report and test helpers sit here.
"""
