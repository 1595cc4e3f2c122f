"""Unlearning: twelve methods (loss-, representation- and weight-space), full-parameter or LoRA.

``config`` holds the run description and its validation (torch-free), ``presets`` the named
hyper-parameter sets (``--preset``; torch-free), ``losses`` the pure loss functions,
``dpo_pairs`` DPO's refusal-vs-continuation pairs, ``hooks`` the hidden-state capture/injection, ``adversary`` the LAT inner loop,
``methods`` one object per method, ``lora`` the PEFT wrapping and ``trainer`` the accelerate loop
that writes ``OUT/model``, ``config.json``, ``train_log.csv`` and ``eval.json``.
"""

from unlearn_lens.unlearning.config import METHODS, UnlearnConfig

__all__ = ["METHODS", "UnlearnConfig"]
