"""The one exception type users see: a clear one-line message, no traceback (torch-free).

``UserError`` is a ``click.ClickException``, so every command, whether run by ``cli.main``, by
click's ``CliRunner`` or inside the pipeline, prints it as ``error: ...`` and exits with 2.
"""

import click


class UserError(click.ClickException):
    """Bad input or an unmet precondition; shown as one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)

    def __str__(self) -> str:
        return self.message
