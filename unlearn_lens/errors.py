"""Kept only as an alias of :mod:`unlearn_lens.core.errors` for code written against the old path.

New code imports ``from unlearn_lens.core.errors import UserError``.
"""

from unlearn_lens.core.errors import UserError

__all__ = ["UserError"]
