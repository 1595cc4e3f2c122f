"""Attacks that try to bring unlearned knowledge back (issue #15).

Minimal version written by engineer B against the fixed interface; engineer A's package (runner,
ablation, command) replaces it at merge.
"""

from unlearn_lens.attacks.base import ATTACKS, METRICS, AttackContext, AttackResult, AttackSettings

__all__ = ["ATTACKS", "METRICS", "AttackContext", "AttackResult", "AttackSettings"]
