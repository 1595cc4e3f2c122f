"""Quiet the import-time warnings of optional libraries that tell a user of this tool nothing to act on.

Importing peft imports torchao and bitsandbytes, and on a CPU machine each logs a warning at import:
torchao that its CUDA kernels (``_C_mxfp8``, ``_C_cutlass_90a``) do not load, bitsandbytes that its
optional hub kernel was not fetched (the hub is never trusted here), and torch's pytree that
torchao registers enums the old way. They appear before every attack and every LoRA run and hide
the lines that matter. The command line raises these loggers to ERROR; errors still show, and a
library user who imports ``unlearn_lens`` keeps their own logging untouched.
"""

from __future__ import annotations

import logging

#: Loggers whose warnings are import-time noise on the machines this tool runs on (see the docstring).
NOISY_LOGGERS = ("torchao", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree")


def quiet_library_logs() -> None:
    """Show only errors from NOISY_LOGGERS (call before the libraries are imported)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
