"""Attacks that try to bring unlearned knowledge back, run against a base / modified pair.

``unlearn-lens attack`` runs them (``runner.run_attacks``) and writes ``OUT/NAME/attacks/``:
``attacks.csv`` (one row per attack, setting and target, with recovery fractions), ``summary.json``
and plots. ``base`` holds the interface (settings, context, results, registry); ``ablation`` removes
the directions the unlearning moved the residual stream along (found from the activation caches);
``quantization`` and ``relearning`` hold the other attacks.
"""

from unlearn_lens.attacks.base import (ATTACKS, METRICS, AttackContext, AttackResult, AttackSettings,
                                       resolve_attack)

__all__ = ["ATTACKS", "METRICS", "AttackContext", "AttackResult", "AttackSettings", "resolve_attack"]
