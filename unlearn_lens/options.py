"""Click option bundles shared by every command: each flag's name, type, help and default once.

A command stacks the flags it takes (``@options.model()``, ``@options.compute(...)``...). Where
commands legitimately differ in a default (lipschitz computes in float32, the model-running
diagnostics read 128 tokens, ...), the bundle takes the default as a parameter and the value is
a named constant of ``unlearn_lens.core.settings``. Only click and the torch-free core are
imported here, so the torch-free ``analyses`` commands use the same flags (an import-linter
contract in pyproject allows exactly this edge).
"""

from __future__ import annotations

from typing import Any, Callable

import click

from unlearn_lens.core.limits import check_count
from unlearn_lens.core.settings import (DEFAULT_BATCH_SIZE, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MAX_LENGTH,
                                        DEFAULT_SEED, MODEL_DTYPES)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

MODEL_HELP = "Model: hub id, local HF directory or .gguf file."
DATA_HELP = ("Data directory with forget.txt, retain.txt, wmdp_mcq.jsonl (`unlearn-lens datasets create`).")
DTYPE_HELP = "Model dtype (auto: float32 on CPU, bfloat16 on GPU)."
DEVICE_HELP = "Torch device to run on (cpu, cuda, cuda:1, mps)."
MEASURED_SAMPLES_HELP = "At most this many measured forget texts, retain texts and questions (default: all)."
NAME_HELP = ("Name of the model in outputs (default: derived from --model's path: its last component; "
             "the parent's for .../model).")


class Count(click.types.IntParamType):
    """An integer flag whose lower bound is the core's rule for ``field`` (``unlearn_lens.core.limits``).

    The flag refuses a value below it while the command line is parsed, with the message the run
    functions give (the pipeline calls them with no command line): one rule, one message.
    """

    def __init__(self, field: str) -> None:
        self.field = field

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = super().convert(value, param, ctx)
        check_count(self.field, number)
        return number


def stack(*decorators: Decorator) -> Decorator:
    """One decorator applying ``decorators`` so that --help lists them in the given order."""
    def decorate(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return decorate


# --- a model ----------------------------------------------------------------------------------

def model(param: str = "model_spec", *, required: bool = True, help: str = MODEL_HELP) -> Decorator:
    """``--model``: the model a command runs (hub id, HF directory or .gguf)."""
    return click.option("--model", param, required=required, **({} if required else {"default": None}), help=help)


def revision(*aliases: str, name: str = "--revision", param: str | None = None, of: str = "--model") -> Decorator:
    """``--revision`` (or ``name``, e.g. --revision-b): the hub revision of the model flag ``of``."""
    names = [name, *aliases]
    decls = names if param is None else [*names, param]
    return click.option(*decls, default=None, help=f"Hub revision (branch, tag or commit) of {of}.")


def arch_spec() -> Decorator:
    """``--arch-spec``: a JSON architecture description for a family the adapter does not know."""
    return click.option("--arch-spec", default=None, type=click.Path(dir_okay=False),
                        help="JSON architecture description for a model outside the known families.")


def trust_remote_code() -> Decorator:
    """``--trust-remote-code``: off unless asked (a model's own code is arbitrary code)."""
    return click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (off by default).")


def model_pair(*, base_help: str = "Base model: hub id, local HF directory or .gguf file.",
               modified_help: str = "Modified (unlearned / filtered) model, same architecture as --model-a.",
               revision_alias: bool = False) -> Decorator:
    """``--model-a``/``--model-b`` and their revisions: a base and a modified model compared."""
    return stack(click.option("--model-a", required=True, metavar="BASE", help=base_help),
                 revision(*(["--revision"] if revision_alias else []), name="--revision-a", param="revision_a",
                          of="--model-a" + (" (--revision is an alias)" if revision_alias else "")),
                 click.option("--model-b", required=True, metavar="MODIFIED", help=modified_help),
                 revision(name="--revision-b", of="--model-b"))


# --- data and outputs --------------------------------------------------------------------------

def data(param: str = "data_dir", *, required: bool = True, must_exist: bool = False,
         help: str = DATA_HELP) -> Decorator:
    """``--data``: a data directory from `unlearn-lens datasets create`."""
    kind = click.Path(exists=True, file_okay=False) if must_exist else \
        click.Path(file_okay=False) if not required else click.Path()
    return click.option("--data", param, required=required, **({} if required else {"default": None}), type=kind,
                        help=help)


def outdir(*, default: str | None = None, must_exist: bool = False, help: str = "Output root.") -> Decorator:
    """``--outdir``: the output root (required unless the command has a ``default``)."""
    given = {} if default is None else {"default": default, "show_default": True}
    kind = click.Path(file_okay=False, exists=True) if must_exist else click.Path(file_okay=False)
    return click.option("--outdir", required=default is None, type=kind, help=help, **given)


def name(help: str = NAME_HELP) -> Decorator:
    """``--name``: the model's name in output folders (derived from its path by default)."""
    return click.option("--name", default=None, help=help)


def max_samples(default: int | None = None, *,
                help: str = "At most this many forget texts, retain texts and questions (default: all).") -> Decorator:
    """``--max-samples``: texts (and questions) per split read."""
    shown = {} if default is None else {"show_default": True}
    return click.option("--max-samples", type=Count("max_samples"), default=default, help=help, **shown)


def max_length(default: int = DEFAULT_MAX_LENGTH, *, help: str = "Tokens per text (truncated).") -> Decorator:
    """``--max-length``: tokens per text."""
    return click.option("--max-length", type=Count("max_length"), default=default, show_default=True, help=help)


def overwrite(help: str = "Recompute even if the output folder is complete.") -> Decorator:
    """``--overwrite``: redo a finished output."""
    return click.option("--overwrite", is_flag=True, help=help)


def force(help: str = "Redo steps that are already complete.") -> Decorator:
    """``--force``: redo finished work (params, pipeline, demo)."""
    return click.option("--force", is_flag=True, help=help)


def seed(help: str = "Seed of the command's random choices.") -> Decorator:
    """``--seed``."""
    return click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help=help)


# --- compute -----------------------------------------------------------------------------------

def device(default: str = DEFAULT_DEVICE, *, help: str = DEVICE_HELP) -> Decorator:
    """``--device``: where the model runs."""
    return click.option("--device", default=default, show_default=True, help=help)


def dtype(default: str = DEFAULT_DTYPE, *, name: str = "--dtype", param: str | None = None,
          choices: tuple[str, ...] | None = MODEL_DTYPES, help: str = DTYPE_HELP) -> Decorator:
    """``--dtype``: the model's compute dtype (``choices=None``: free text, checked where it is used)."""
    decls = [name] if param is None else [name, param]
    kind = click.Choice(list(choices)) if choices else None
    return click.option(*decls, default=default, show_default=True, type=kind, help=help)


def batch_size(default: int = DEFAULT_BATCH_SIZE, *, help: str = "Texts or prompts per forward pass.") -> Decorator:
    """``--batch-size``."""
    return click.option("--batch-size", type=Count("batch_size"), default=default, show_default=True, help=help)


def eval_batch_size(default: int = DEFAULT_BATCH_SIZE, *, help: str = "Batch size of evaluation.") -> Decorator:
    """``--eval-batch-size``: texts per forward pass when a training command evaluates."""
    return click.option("--eval-batch-size", type=Count("eval_batch_size"), default=default, show_default=True,
                        help=help)


def workers(default: int | None = None, *, help: str = "Worker processes.") -> Decorator:
    """``--workers``: parallel workers (processes or threads, as the command says)."""
    shown = {} if default is None else {"show_default": True}
    return click.option("--workers", type=Count("workers"), default=default, help=help, **shown)


def compute(*, device_default: str = DEFAULT_DEVICE, dtype_default: str = DEFAULT_DTYPE,
            dtype_help: str = DTYPE_HELP, batch_default: int | None = DEFAULT_BATCH_SIZE,
            batch_help: str = "Texts or prompts per forward pass.") -> Decorator:
    """``--device``, ``--dtype`` and (unless ``batch_default`` is None) ``--batch-size``."""
    parts = [device(device_default), dtype(dtype_default, help=dtype_help)]
    if batch_default is not None:
        parts.append(batch_size(batch_default, help=batch_help))
    return stack(*parts)


def model_side(*, model_help: str = MODEL_HELP, with_arch_spec: bool = False) -> Decorator:
    """A model command's model: ``--model``, ``--revision`` (, ``--arch-spec``), ``--trust-remote-code``."""
    parts = [model(help=model_help), revision()]
    if with_arch_spec:
        parts.append(arch_spec())
    return stack(*parts, trust_remote_code())
