"""Hidden states by running the model: training residuals and WMDP letter/cloze states.

Forward hooks on ``ArchitectureAdapter.block(i)`` record the residual stream in the cache's
convention (layer 0 = embedding output, l = output of block l, before the final norm), so these
arrays equal what ``cache_data`` reads from an activation cache of the same model.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from unlearn_lens.lipschitz import batched, pad_batch
from unlearn_lens.tuned_lens.questions import ClozeData, LetterData


def run_with_residuals(model, adapter, input_ids, attention_mask):
    """Residual stream (L+1, B, T, d) of one batch via hooks on the blocks, and the logits.

    Layer 0 is block 0's input (the embedding output, positions included where the model adds
    them), layer l the output of block l.
    """
    import torch

    states: list[Any] = [None] * (adapter.num_layers + 1)

    def pre_hook(_module, args, kwargs):
        states[0] = args[0] if args else kwargs["hidden_states"]

    def make_hook(index: int):
        def hook(_module, _args, output):
            states[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [adapter.block(0).register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [adapter.block(i).register_forward_hook(make_hook(i + 1)) for i in range(adapter.num_layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([s.detach() for s in states]), out.logits


def model_token_residuals(model, adapter, tokenized: Sequence[Sequence[int]], *, pad_id: int,
                          batch_size: int, device: str, progress=None):
    """Residuals of every real token, flat: (L+1, n_tokens, d) on the CPU, in the model's dtype."""
    import torch

    chunks = []
    for _, chunk in batched(list(tokenized), batch_size):
        input_ids, mask = pad_batch(chunk, pad_id)
        resid, _ = run_with_residuals(model, adapter, input_ids.to(device), mask.to(device))
        chunks.append(resid[:, mask.to(device).bool()].cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(chunks, dim=1)


def _left_truncate(ids: list[int], max_length: int) -> tuple[list[int], int]:
    cut = max(0, len(ids) - max_length)
    return ids[cut:], cut


def letter_data_from_model(model, adapter, tokenizer, items, *, max_length: int, batch_size: int,
                           device: str) -> LetterData:
    """Run the letter prompts (left-truncated to ``max_length``) and keep the last-token states."""
    import torch

    from unlearn_lens.prompts import encode_prompt, letter_prompt, letter_token_ids

    letter_ids = letter_token_ids(tokenizer)
    prompts = [letter_prompt(it.question, it.choices) for it in items]
    tokenized = [_left_truncate(encode_prompt(tokenizer, p), max_length)[0]
                 for p in prompts]
    lasts = []
    for _, chunk in batched(tokenized, batch_size):
        input_ids, mask = pad_batch(chunk, tokenizer.pad_token_id)
        resid, _ = run_with_residuals(model, adapter, input_ids.to(device), mask.to(device))
        positions = torch.tensor([len(s) - 1 for s in chunk], device=resid.device)
        lasts.append(resid[:, torch.arange(len(chunk), device=resid.device), positions].float().cpu())
    return LetterData(torch.cat(lasts, dim=1), np.array([it.answer for it in items]), letter_ids)


def cloze_sequences(tokenizer, items, max_length: int) -> list[tuple[list[int], int, int, int, int]]:
    """``(ids, cont_start, cont_end, question, choice)`` per question x choice.

    Context and continuation are tokenised separately and concatenated, so the boundary is exact
    (the cache's convention); sequences longer than ``max_length`` lose tokens on the left.
    """
    from unlearn_lens.prompts import cloze_context, cloze_continuations, encode_prompt

    sequences = []
    for q, item in enumerate(items):
        context = encode_prompt(tokenizer, cloze_context(item.question))
        for c, continuation in enumerate(cloze_continuations(item.choices)):
            cont = encode_prompt(tokenizer, continuation)
            ids, cut = _left_truncate(context + cont, max_length)
            start = max(len(context) - cut, 1)
            sequences.append((ids, start, len(ids), q, c))
    return sequences


def cloze_data_from_model(model, adapter, tokenizer, items, *, max_length: int, batch_size: int,
                          device: str) -> ClozeData:
    """Run every question x choice sequence and keep the states that predict continuation tokens."""
    import torch

    sequences = cloze_sequences(tokenizer, items, max_length)
    states, targets, owner = [], [], []
    for start, chunk in batched(sequences, batch_size):
        input_ids, mask = pad_batch([s[0] for s in chunk], tokenizer.pad_token_id)
        resid, _ = run_with_residuals(model, adapter, input_ids.to(device), mask.to(device))
        for row, (ids, cont_start, cont_end, _, _) in enumerate(chunk):
            positions = list(range(cont_start - 1, cont_end - 1))
            states.append(resid[:, row, positions].float().cpu())
            targets += [ids[p + 1] for p in positions]
            owner += [start + row] * len(positions)
    return ClozeData(torch.cat(states, dim=1), np.array(targets, dtype=np.int64), np.array(owner, dtype=np.int64),
                     np.array([s[3] for s in sequences]), np.array([s[4] for s in sequences]),
                     np.array([it.answer for it in items]))
