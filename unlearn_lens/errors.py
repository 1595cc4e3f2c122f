"""The one exception type users see: a clear one-line message, no traceback (torch-free)."""


class UserError(Exception):
    """Bad input or an unmet precondition; the CLI prints the message on one line and exits 2."""
