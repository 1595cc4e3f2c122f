"""The ``unlearn-lens`` command line: a click group whose subcommands load on first use.

Subcommands are registered by import path so that ``unlearn-lens analyze`` and ``cache`` never
import torch (they run on CPU nodes without it) and ``--help`` stays instant. Every
``UserError`` (a plain exception of the torch-free core) becomes a one-line message on stderr
and exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from unlearn_lens import __version__
from unlearn_lens.core.environment import explain
from unlearn_lens.core.library_logs import quiet_library_logs
from unlearn_lens.core.errors import UserError

#: name -> (import path "module:attribute", one-line help shown by ``unlearn-lens --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("unlearn_lens.commands.models:models", "Materialise or inspect models (e.g. the offline SmolLM2 demo model)."),
    "datasets": ("unlearn_lens.commands.datasets:datasets", "Build forget / retain / WMDP multiple-choice data sets."),
    "capture": ("unlearn_lens.commands.capture:capture", "Record activations (residuals, MLP inputs, WMDP logits) into a resumable Zarr cache."),
    "cache": ("cache_store.commands:cache", "Inspect (info) and check (verify) activation caches; no model needed."),
    "plant": ("unlearn_lens.commands.plant:plant", "Fine-tune a model on the facts of a planted-facts testbed (`datasets create --facts N`)."),
    "unlearn": ("unlearn_lens.commands.unlearn:unlearn", "Unlearn the forget set with one of 12 methods (full-parameter or LoRA)."),
    "unlearn-all": ("unlearn_lens.commands.unlearn:unlearn_all", "Run several unlearning methods into OUT/<method>/, skipping finished ones."),
    "pipeline": ("unlearn_lens.commands.pipeline:pipeline", "Run every step for every comparison base -> NAME, resumably, and write the report."),
    "study": ("unlearn_lens.commands.study:study", "Do the signatures predict recovery? Unlearn at several strengths per method, measure, predict leave-one-method-out."),
    "demo": ("unlearn_lens.commands.pipeline:demo", "The whole pipeline offline on SmolLM2 with models unlearned here; prints the report path."),
    "report": ("analyses.commands.report:report", "Rebuild OUTDIR/report.html from existing outputs (no model needed)."),
    "infer": ("unlearn_lens.commands.infer:infer", "Generate text from one model, two side by side, interactively, or a sweep to CSV."),
    "params": ("analyses.commands.params:params", "Parameter-space diagnostics of dW = W_b - W_a (norms, ranks, subspaces, null space) from checkpoints."),
    "analyze": ("analyses.commands.analyze:analyze", "Activation diagnostics (norms, separation, covariance, row space, probes, logit lens) from caches."),
    "lipschitz": ("unlearn_lens.commands.lipschitz:lipschitz", "Local Lipschitz, input-gradient norm and output variance of two models, forget vs retain."),
    "tuned-lens": ("unlearn_lens.commands.tuned_lens:tuned_lens", "Train a tuned lens and report WMDP accuracy per layer (letter and cloze)."),
    "eval": ("unlearn_lens.commands.eval:eval_command", "Zero-shot WMDP accuracy (letter and cloze), forget NLL and retain perplexity of one model."),
    "attack": ("unlearn_lens.commands.attack:attack", "Is the knowledge still there? Direction ablation, quantization and relearning attacks with recovery fractions."),
    "relearn": ("unlearn_lens.commands.relearn:relearn", "Fine-tuning attack on a few forget texts (and a retain control): steps to recover half the gap to the base."),
}


class CommandError(click.ClickException):
    """A ``UserError`` as click shows it: ``error: <message>`` on stderr, exit status 2.

    The core's ``UserError`` is a plain exception (storage and analyses know no CLI framework);
    ``LazyGroup.invoke`` turns it into this one, so ``cli.main``, click's ``CliRunner`` and the
    pipeline all print the same line and exit with the same status.
    """

    exit_code = UserError.exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)

    def __str__(self) -> str:
        return self.message


#: top-level modules of the ``models`` extra; a command that imports one of them needs that extra
MODEL_SIDE = frozenset({"torch", "transformers", "nnsight", "peft", "accelerate", "datasets", "torchao"})


def missing_model_side(exc: ImportError, command: str | None = None) -> UserError | None:
    """The one-line error for a missing ``models`` extra, or None for any other import error."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or name not in MODEL_SIDE:
        return None
    what = f"unlearn-lens {command}" if command else "this command"
    return UserError(f"{what} needs the model side: pip install 'unlearn-lens[models]'")


#: the flags naming where a command writes (named in a full-disk message)
OUTPUT_FLAGS = ("--out", "--outdir")


def output_location(args: list[str]) -> str | None:
    """The value of the command line's output flag (``--out`` / ``--outdir``), if it has one."""
    for index, arg in enumerate(args):
        name, sep, value = arg.partition("=")
        if name in OUTPUT_FLAGS:
            return value if sep else (args[index + 1] if index + 1 < len(args) else None)
    return None


class LazyGroup(click.Group):
    """A click group that imports each subcommand only when it is invoked."""

    #: the last subcommand looked up (named in the missing-``models`` message)
    last_command: str | None = None

    def invoke(self, ctx: click.Context):
        """Run the subcommand; a ``UserError`` (from option parsing too) or a broken environment (no
        credentials, a refused connection, a full disk: ``core.environment.explain``) becomes a
        ``CommandError``."""
        output = output_location([*getattr(ctx, "_protected_args", []), *ctx.args])
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise CommandError(exc.message) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            message = explain(exc, writing=output)
            if message is None:
                raise
            raise CommandError(message) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            LazyGroup.last_command = name
            module_name, attribute = COMMANDS[name][0].split(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:  # a base install (no torch) running a model-side command
                error = missing_model_side(exc, name)
                if error is None:
                    raise
                raise error from None
            return getattr(module, attribute)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def load_env_file(path: str = ".env") -> None:
    """Read HF_TOKEN / WANDB_API_KEY from ``.env`` into the environment (never printed)."""
    if os.path.isfile(path):
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="unlearn-lens")
def group() -> None:
    """unlearn-lens: what did unlearning actually do to this model?

    Capture activations once, then compare a base model with its unlearned or filtered
    variants in parameter space and activation space. Start with `unlearn-lens demo`.
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the group, turning user errors into one-line messages."""
    load_env_file()
    quiet_library_logs()
    try:
        group.main(args=argv, prog_name="unlearn-lens", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # UserError included (as CommandError): "error: ..." and exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:  # raised outside a subcommand (none today): the same line and status
        CommandError(exc.message).show()
        sys.exit(exc.exit_code)
    except ImportError as exc:  # a model-side module imported inside a command on a base install
        error = missing_model_side(exc, LazyGroup.last_command)
        if error is None:
            _internal_error(exc)
        CommandError(error.message).show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; finished work is kept and the same command resumes", err=True)
        sys.exit(130)
    except Exception as exc:  # a broken environment in one line; else an internal bug: the traceback on request
        message = explain(exc)
        if message is None:
            _internal_error(exc)
        CommandError(message).show()
        sys.exit(UserError.exit_code)


def _internal_error(exc: BaseException) -> None:
    """Report an unexpected exception in one line (or re-raise it under UNLEARN_LENS_DEBUG); exit 1."""
    if os.environ.get("UNLEARN_LENS_DEBUG"):
        raise exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    click.echo(f"internal error: {type(exc).__name__}: {first} (set UNLEARN_LENS_DEBUG=1 for the traceback)", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
