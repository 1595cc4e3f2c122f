"""Diagnostics that read caches and checkpoints; never imports torch, transformers or nnsight."""
