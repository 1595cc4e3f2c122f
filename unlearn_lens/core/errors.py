"""The one exception type users see: a clear one-line message, no traceback.

``UserError`` is a plain ``Exception`` (no CLI framework below the CLI): ``cli.py`` turns it
into ``error: <message>`` on stderr and exit status 2, whether the command runs from
``cli.main``, click's ``CliRunner`` or inside the pipeline.
"""


class UserError(Exception):
    """Bad input or an unmet precondition; shown as one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
