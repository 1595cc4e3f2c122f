"""Every command's flags and defaults stay as they were before the refactor of issue #17.

``tests/data/cli_flags_before_issue17.json`` was taken from main's code before the refactor
began (the same function below, run on that tree): for every command and subcommand, each
option's names, default, flag/multiple/required, type, choices and whether --help shows the
default. A flag added on purpose later is added to the snapshot in the same commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

SNAPSHOT = Path(__file__).parent / "data" / "cli_flags_before_issue17.json"


def _entry(param: click.Parameter) -> dict:
    default = param.default
    if callable(default):
        default = "<callable>"
    try:
        json.dumps(default)
    except TypeError:
        default = repr(default)
    show = getattr(param, "show_default", None)
    return {"opts": sorted([*param.opts, *param.secondary_opts]), "default": default,
            "flag": bool(getattr(param, "is_flag", False)), "multiple": bool(getattr(param, "multiple", False)),
            "required": bool(param.required), "type": param.type.name,
            "show_default": show if isinstance(show, (bool, str, type(None))) else True,
            "choices": list(getattr(param.type, "choices", []) or [])}


def _walk(command: click.Command, path: str, out: dict) -> None:
    out[path] = sorted((_entry(p) for p in command.params), key=lambda e: e["opts"])
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            _walk(sub, f"{path} {name}", out)


def flags_of_every_command() -> dict:
    from cli import COMMANDS, group

    out: dict = {}
    context = click.Context(group)
    for name in sorted(COMMANDS):
        _walk(group.get_command(context, name), name, out)
    return json.loads(json.dumps(out))


def test_every_command_keeps_its_flags_and_defaults():
    before = json.loads(SNAPSHOT.read_text())
    now = flags_of_every_command()
    assert sorted(now) == sorted(before)
    for command in before:
        assert now[command] == before[command], command
