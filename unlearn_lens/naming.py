"""Kept only as an alias of :mod:`unlearn_lens.core.naming` for code written against the old path."""

from unlearn_lens.core.naming import *  # noqa: F401,F403
from unlearn_lens.core.naming import ParamInfo, classify, family_for_model_type, family_from_config  # noqa: F401
