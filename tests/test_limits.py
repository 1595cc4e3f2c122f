"""Each count rule is written once (``unlearn_lens/core/limits.py``) and refused the same way by every
command's flag and by every run function the pipeline calls (issue #25)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli import COMMANDS, group
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.limits import MINIMUM, at_least_message, flag_of
from unlearn_lens.core.settings import Compute, ModelRef
from unlearn_lens.options import Count

ROOT = Path(__file__).resolve().parents[1]


def _count_flags() -> list[tuple[list[str], str, str]]:
    """(command path, flag, settings field) of every flag typed by a core rule, over every command."""
    found = []
    context = click.Context(group)

    def walk(command: click.Command, path: list[str]) -> None:
        for param in command.params:
            if isinstance(param.type, Count):
                found.append((path, param.opts[0], param.type.field))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    for name in sorted(COMMANDS):
        walk(group.get_command(context, name), [name])
    return found


COUNT_FLAGS = _count_flags()


def test_the_shared_count_flags_are_typed_by_the_rule_everywhere():
    flags = {(" ".join(path), flag) for path, flag, _ in COUNT_FLAGS}
    for command in ("capture", "eval", "lipschitz", "tuned-lens", "relearn", "attack", "unlearn", "pipeline"):
        assert (command, "--max-length") in flags and (command, "--max-samples") in flags, command
    for command in ("capture", "eval", "lipschitz", "tuned-lens", "relearn", "attack", "unlearn", "pipeline"):
        assert (command, "--batch-size") in flags, command
    assert ("analyze", "--workers") in flags and ("params", "--workers") in flags
    assert len(COUNT_FLAGS) >= 30


@pytest.mark.parametrize("path,flag,field", COUNT_FLAGS, ids=[f"{' '.join(p)} {f}" for p, f, _ in COUNT_FLAGS])
def test_a_value_below_the_rule_is_one_line_before_anything_runs(path, flag, field):
    minimum, why = MINIMUM[field]
    result = CliRunner().invoke(group, [*path, flag, str(minimum - 1)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: " + at_least_message(flag, minimum, minimum - 1, why)


def test_the_rule_message_is_written_once_in_the_code():
    """No module but the core's limits spells out a count rule's message (the seven copies are gone)."""
    pattern = re.compile(r"must be at least")
    offenders = [str(p.relative_to(ROOT)) for folder in ("unlearn_lens", "analyses", "cache_store")
                 for p in (ROOT / folder).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == ["unlearn_lens/core/limits.py"]


def test_the_alias_modules_are_gone():
    """``unlearn_lens.errors`` and ``unlearn_lens.naming`` were aliases of the core's modules; nothing
    imports them and they are removed (the core's ``errors`` and ``naming`` are the only ones)."""
    for name in ("errors", "naming"):
        assert not (ROOT / "unlearn_lens" / f"{name}.py").exists()
    imports = re.compile(r"unlearn_lens(\.| import )(errors|naming)\b")
    users = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
             if p.name != "test_limits.py" and imports.search(p.read_text())]
    assert users == []


def _expect(field: str, value: int):
    minimum, why = MINIMUM[field]
    return pytest.raises(UserError, match=re.escape(at_least_message(flag_of(field), minimum, value, why)))


def test_run_functions_called_from_python_refuse_the_same_values(tmp_path):
    """The pipeline calls run functions with settings, no command line: the same rule, the same line."""
    from analyses.activations.analyze_step import AnalyzeSettings, run_analyze
    from unlearn_lens.attacks.base import AttackSettings
    from unlearn_lens.attacks.runner import validate
    from unlearn_lens.eval_run import EvalSettings, run_eval
    from unlearn_lens.lipschitz import validate_options as lipschitz_options
    from unlearn_lens.relearn import validate_relearn
    from unlearn_lens.tuned_lens.step import validate_options as tuned_lens_options
    from unlearn_lens.unlearning.config import UnlearnConfig

    with _expect("batch_size", 0):
        run_eval(EvalSettings(ModelRef("m"), str(tmp_path), str(tmp_path), compute=Compute(batch_size=0)))
    with _expect("max_length", 1):
        lipschitz_options(eps_values=[0.1], n_perturb=2, batch_size=1, max_length=1, max_samples=None)
    with _expect("max_samples", 0):
        tuned_lens_options(steps=1, lr=1e-3, tokens_per_step=8, batch_size=1, max_length=8, max_samples=0,
                           train_split="retain", name="x")
    with _expect("eval_batch_size", 0):
        validate_relearn(steps=1, lr=1e-3, eval_every=1, batch_size=1, eval_batch_size=0, max_length=8,
                         forget_subset=1, max_samples=None)
    with _expect("batch_size", 0):
        validate(AttackSettings(base="a", model="b", name="b", data=str(tmp_path), outdir=str(tmp_path),
                                batch_size=0))
    with _expect("max_length", 0):
        UnlearnConfig(model="m", data="d", outdir="o", method="ga", max_length=0).validate()
    with _expect("workers", 0):
        run_analyze(AnalyzeSettings(base_cache="a", compare=("b=c",), outdir=str(tmp_path), workers=0))
