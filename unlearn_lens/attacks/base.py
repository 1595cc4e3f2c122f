"""The attack interface: settings, the context an attack runs in, one result row, the registry.

Minimal version (engineer B) with exactly the interface's names; engineer A's version, with the
runner, is kept at merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: Keys of ``evaluation.evaluate()`` every attack row reports.
METRICS = ("letter_accuracy", "cloze_accuracy", "forget_nll", "retain_nll")

#: Attack name -> "module:function" (imported lazily), each callable(ctx) -> Iterable[AttackResult].
ATTACKS = {"ablate": "unlearn_lens.attacks.ablation:run",
           "quantize": "unlearn_lens.attacks.quantization:run",
           "relearn-unrelated": "unlearn_lens.attacks.relearning:run_unrelated",
           "relearn-heldout": "unlearn_lens.attacks.relearning:run_heldout"}


@dataclass(frozen=True)
class AttackSettings:
    """What an attack run needs (the `attack` command's options)."""

    base: str
    model: str
    name: str
    data: str
    outdir: str
    attacks: tuple[str, ...] = ("ablate", "quantize", "relearn-unrelated", "relearn-heldout")
    cache_base: str | None = None
    cache_model: str | None = None
    base_revision: str | None = None
    model_revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    max_length: int = 512
    max_samples: int | None = None
    seed: int = 0
    force: bool = False
    trust_remote_code: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class AttackResult:
    """One row of attacks.csv: an attack setting applied to the modified model or the base (control)."""

    attack: str
    setting: str
    target: str
    metrics: dict[str, float]
    seconds: float
    reference: dict[str, dict[str, float]] | None = None
    extra: dict[str, object] = field(default_factory=dict)


class AttackContext:
    """Loads fresh copies of the two models and evaluates them on the run's data."""

    def __init__(self, settings: AttackSettings, data=None, attack_dir: Path | None = None,
                 reference: dict[str, dict[str, float]] | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        from unlearn_lens.relearn import load_eval_data

        self.settings = settings
        self.data = data if data is not None else load_eval_data(settings.data, settings.max_samples)
        self.attack_dir = Path(attack_dir) if attack_dir else Path(settings.outdir) / settings.name / "attacks"
        self.reference = reference or {}
        self._progress = progress or (lambda message: None)

    def load(self, which: str) -> tuple[Any, Any]:
        """A fresh copy of the base or the modified model (eval mode) and its tokenizer."""
        from unlearn_lens.relearn import _load

        s = self.settings
        spec, revision = {"base": (s.base, s.base_revision), "modified": (s.model, s.model_revision)}[which]
        device = "cpu" if s.device == "auto" else s.device
        model, tokenizer = _load(spec, revision, s.dtype, device, s.trust_remote_code)
        model.eval()
        return model, tokenizer

    def evaluate(self, model, tokenizer, data=None) -> dict[str, float]:
        """``evaluation.evaluate`` on ``data`` (default: the run's data)."""
        from unlearn_lens.relearn import _evaluate

        return _evaluate(model, tokenizer, data if data is not None else self.data, self.settings.max_length,
                         self.settings.batch_size)

    def progress(self, message: str) -> None:
        self._progress(message)
