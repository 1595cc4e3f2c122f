"""Read and perturb the residual stream at block outputs through forward hooks.

Blocks are found through the ``ArchitectureAdapter`` (never by index into ``named_modules``);
a block's output is a tensor in transformers 5 and a tuple whose first item is the hidden
state in older versions, and both are handled. Layer ``-1`` names the embedding output (the
input of block 0): an injection there is added by a forward pre-hook on block 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


#: the embedding output (input of block 0), as an injection point.
EMBEDDING = -1


def _add_to_input(args, kwargs, delta):
    """Add ``delta`` to a block's input hidden state, passed positionally or as ``hidden_states``."""
    if args:
        hidden = args[0]
        return (hidden + delta.to(hidden.dtype),) + tuple(args[1:]), kwargs
    hidden = kwargs["hidden_states"]
    return args, {**kwargs, "hidden_states": hidden + delta.to(hidden.dtype)}


class StopForward(Exception):
    """Raised by a hook once every needed block output is captured (see ``stop_after``)."""


@contextmanager
def tap_blocks(adapter, capture: Iterable[int] = (), inject: dict[int, torch.Tensor] | None = None,
               stop_after: int | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the outputs of blocks ``capture`` (into the yielded dict) and add ``inject[i]`` to
    the output of block ``i`` (before capture, so downstream layers and captures see it);
    ``inject[-1]`` is added to the embedding output, the input of block 0.

    With ``stop_after=i`` the forward pass is cut short by ``StopForward`` after block ``i``
    (the caller catches it): representation losses need no later block and no logits.
    """
    capture = set(capture)
    inject = inject or {}
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module, args, output):
            hidden = _hidden_of(output)
            if index in inject:
                hidden = hidden + inject[index].to(hidden.dtype)
                output = _replace_hidden(output, hidden)
            if index in capture:
                captured[index] = hidden
            if index == stop_after:
                raise StopForward
            return output
        return hook

    def embedding_hook(module, args, kwargs):
        return _add_to_input(args, kwargs, inject[EMBEDDING])

    hooked = capture | (set(inject) - {EMBEDDING}) | ({stop_after} if stop_after is not None else set())
    handles = [adapter.block(i).register_forward_hook(make_hook(i)) for i in sorted(hooked)]
    if EMBEDDING in inject:
        handles.append(adapter.block(0).register_forward_pre_hook(embedding_hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
