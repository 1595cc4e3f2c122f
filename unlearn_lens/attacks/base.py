"""The attack interface: settings, the context an attack runs in, its results, and the registry.

An attack is a callable ``run(ctx: AttackContext) -> Iterable[AttackResult]`` registered by dotted
path in ``ATTACKS`` (imported only when asked for, so a missing module fails in one line). Each
attack module declares its options and their defaults once, in a dict ``ATTACK_OPTIONS``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from analyses.recovery import METRICS
from analyses.uncertainty import PER_ITEM
from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.settings import DEFAULT_MAX_LENGTH

#: attack name -> "module:function" (imported lazily).
ATTACKS: dict[str, str] = {
    "ablate": "unlearn_lens.attacks.ablation:run",
    "quantize": "unlearn_lens.attacks.quantization:run",
    "relearn-unrelated": "unlearn_lens.attacks.relearning:run_unrelated",
    "relearn-heldout": "unlearn_lens.attacks.relearning:run_heldout",
}
#: Attacks that read the activation caches.
NEEDS_CACHES = frozenset({"ablate"})

__all__ = ["ATTACKS", "METRICS", "NEEDS_CACHES", "AttackContext", "AttackResult", "AttackSettings",
           "attack_options", "evaluation_record", "metric_values", "per_item_values", "resolve_attack"]


@dataclass(frozen=True)
class AttackSettings:
    """Everything an `unlearn-lens attack` run needs (the CLI flags)."""

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
    max_length: int = DEFAULT_MAX_LENGTH
    max_samples: int | None = None
    seed: int = 0
    force: bool = False
    trust_remote_code: bool = False
    options: dict = field(default_factory=dict)  # attack-specific settings (ATTACK_OPTIONS keys)


@dataclass
class AttackResult:
    """One evaluated (attack, setting, target): the attacked model's metrics."""

    attack: str
    setting: str
    target: str  # "modified" (the attacked unlearned model) or "control" (the base under the same attack)
    metrics: dict[str, float]
    seconds: float
    reference: dict[str, dict] | None = None  # unattacked {"base", "modified"} on the attack's data (with PER_ITEM)
    extra: dict[str, object] = field(default_factory=dict)
    #: each metric's per-item results (``evaluation.evaluate``'s PER_ITEM): what the intervals resample.
    #: Empty: those ``metrics`` carries under PER_ITEM when it is a whole ``evaluate`` result.
    per_item: dict[str, dict] = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON-ready dict (what the runner stores per attack), the per-item results included."""
        reference = None if self.reference is None else {which: evaluation_record(values or {})
                                                         for which, values in self.reference.items()}
        return {"attack": self.attack, "setting": self.setting, "target": self.target,
                "metrics": {m: float(self.metrics.get(m, float("nan"))) for m in METRICS},
                PER_ITEM: self.per_item or per_item_values(self.metrics), "seconds": float(self.seconds),
                "reference": reference, "extra": dict(self.extra)}


def metric_values(evaluation: dict) -> dict[str, float]:
    """METRICS' values of an evaluation (``evaluation.evaluate``'s result)."""
    return {m: float(evaluation[m]) for m in METRICS if m in evaluation}


def per_item_values(evaluation: dict) -> dict[str, dict]:
    """The per-item results of METRICS in an evaluation (its ``PER_ITEM``); {} when it has none."""
    per_item = evaluation.get(PER_ITEM) or {}
    return {m: per_item[m] for m in METRICS if per_item.get(m)}


def evaluation_record(evaluation: dict) -> dict:
    """METRICS' values and, under PER_ITEM, their per-item results: what a stored reference keeps."""
    return {**metric_values(evaluation), PER_ITEM: per_item_values(evaluation)}


def resolve_attack(name: str) -> Callable[["AttackContext"], Iterable[AttackResult]]:
    """The ``run`` callable of attack ``name``; a one-line ``UserError`` if unknown or not installed."""
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    module_name, attribute = ATTACKS[name].split(":")
    module = _import(name, module_name)
    if not hasattr(module, attribute):
        raise UserError(f"attack {name!r}: {module_name} has no {attribute}() (incomplete installation)")
    return getattr(module, attribute)


def _import(name: str, module_name: str) -> Any:
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        raise UserError(f"attack {name!r} is not available in this installation ({module_name} is missing)")
    return importlib.import_module(module_name)


def attack_options(names: Iterable[str]) -> dict[str, Any]:
    """The declared options (name -> default) of the given attacks, merged."""
    options: dict[str, Any] = {}
    for name in names:
        resolve_attack(name)
        module = sys.modules[ATTACKS[name].split(":")[0]]
        options.update(getattr(module, "ATTACK_OPTIONS", {}))
    return options


class AttackContext:
    """What an attack gets: settings, evaluation data, its output folder, models and the evaluation."""

    def __init__(self, settings: AttackSettings, reference: dict[str, dict[str, float]] | None = None,
                 echo: Callable[[str], None] | None = None):
        from unlearn_lens.relearn import load_eval_data

        self.settings = settings
        self.data = load_eval_data(settings.data, settings.max_samples)
        self.attack_dir = outputs.model_dir(settings.outdir, settings.name) / outputs.ATTACKS
        self.reference = reference or {}
        self._echo = echo or (lambda message: print(message, file=sys.stderr))
        self._memo = None

    def option(self, key: str, default: Any = None) -> Any:
        """``settings.options[key]``, else ``default``."""
        return self.settings.options.get(key, default)

    @property
    def device(self) -> str:
        """The torch device: ``auto`` is cuda when available, else cpu."""
        if self.settings.device != "auto":
            return self.settings.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load(self, which: str):
        """A fresh ``(model, tokenizer)`` of ``which`` ("base" or "modified"), eval mode, right padding."""
        from unlearn_lens.loading import load_model

        if which not in ("base", "modified"):
            raise ValueError(f"which must be 'base' or 'modified', got {which!r}")
        s = self.settings
        spec, revision = (s.base, s.base_revision) if which == "base" else (s.model, s.model_revision)
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"--device {self.device} asked for, but no CUDA device is available")
        model, tokenizer = load_model(spec, revision=revision, dtype=s.dtype, device=self.device,
                                      trust_remote_code=s.trust_remote_code)
        tokenizer.padding_side = "right"
        model.eval()
        return model, tokenizer

    def evaluate(self, model, tokenizer, data=None) -> dict[str, float]:
        """``evaluation.evaluate`` on ``data`` (default the run's evaluation data)."""
        from unlearn_lens.evaluation import evaluate

        data = data or self.data
        return evaluate(model, tokenizer, forget_texts=data.forget, retain_texts=data.retain, mcq_items=data.items,
                        value_spans=data.value_spans, max_length=self.settings.max_length,
                        batch_size=self.settings.batch_size)

    def memoised(self, which: str, transform: dict | None, compute: Callable[[], dict], data=None,
                 what: str = "") -> tuple[dict, float]:
        """``(result, seconds)`` of ``compute()`` (which evaluates ``which`` after ``transform`` on ``data``),
        read from the evaluation memo (``unlearn_lens/eval_memo.py``) when it ran before; ``force`` recomputes."""
        from unlearn_lens import eval_memo

        if self._memo is None:
            self._memo = eval_memo.EvalMemo(self.settings.outdir, force=self.settings.force,
                                            echo=lambda line: self._echo(f"attack: {line}"))
        s = self.settings
        data = data or self.data
        spec, revision = (s.base, s.base_revision) if which == "base" else (s.model, s.model_revision)
        return self._memo.evaluation(
            what or f"the {which} model", spec, revision, transform, data,
            eval_memo.eval_settings(max_length=s.max_length, batch_size=s.batch_size, dtype=s.dtype, device=s.device),
            compute)

    def progress(self, message: str) -> None:
        self._echo(message)


def timed(function: Callable[[], dict]) -> tuple[dict, float]:
    """``(function(), seconds it took)``."""
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started
