"""One batch through the model: an nnsight trace that saves what the capture keeps, as numpy.

For every sample it records the residual stream at the kept layers (layer 0 = the first block's
input = the embedding output; layer l = block l's output, before the final norm), the kept MLP
inputs, the last real token's state and, for WMDP, the model's own final letter logits and cloze
log-probs from the same trace. Padding (and, under ``--token-sample``, every position not kept)
is dropped on the device before anything is copied to the host.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from unlearn_lens.capture.selection import TOKEN_VARIABLES, Kept
from unlearn_lens.core.errors import UserError

#: Config keys of families whose logits are not just the unembedding of the final norm's output.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class BatchRunner:
    """Runs one nnsight trace over a right-padded batch and returns numpy arrays of the kept tokens."""

    def __init__(self, model, adapter, store_dtype: str, letter_ids: list[int] | None = None,
                 kept: Kept | None = None):
        from nnsight import NNsight

        self.model, self.adapter = model, adapter
        self.traced = NNsight(model)
        self.store_dtype = store_dtype
        self.letter_ids = letter_ids
        self.device = next(model.parameters()).device
        L = adapter.num_layers
        self.resid_layers = list(kept.resid_layers) if kept else list(range(L + 1))
        self.mlp_layers = list(kept.mlp_layers) if kept else list(range(L))
        self.variables = tuple(kept.variables) if kept else TOKEN_VARIABLES
        config = getattr(model, "config", None)
        # The unembedding alone turns final-norm states into the model's logits unless the family
        # rescales or soft-caps them afterwards; then the trace runs to the model's own output.
        self.head_only = not any(getattr(config, key, None) for key in _LOGIT_POSTPROCESSING)

    def pad(self, token_ids: list[np.ndarray]):
        """Right-padded ``input_ids`` and ``attention_mask``: real tokens keep positions 0..n-1."""
        import torch

        width = max(len(ids) for ids in token_ids)
        ids = torch.zeros((len(token_ids), width), dtype=torch.long)
        mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, sample in enumerate(token_ids):
            ids[row, :len(sample)] = torch.from_numpy(sample.astype(np.int64))
            mask[row, :len(sample)] = 1
        return ids.to(self.device), mask.to(self.device)

    def run(self, token_ids: list[np.ndarray], split: str, extra: dict[str, np.ndarray],
            positions: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The kept arrays of one batch; ``positions[row]``: the positions kept of that sample (None: all)."""
        import torch

        ids, mask = self.pad(token_ids)
        lengths = mask.sum(dim=1)
        rows = torch.arange(len(token_ids), device=self.device)
        adapter, traced = self.adapter, self.traced
        saved: dict[int, object] = {}
        mlp_in: list = []
        final: list = []
        head_path = split in ("wmdp", "wmdp_cloze") and self.head_only
        want_mlp = "mlp_in" in self.variables
        with torch.inference_mode():
            with traced.trace(input_ids=ids, attention_mask=mask) as tracer:
                if 0 in self.resid_layers:
                    saved[0] = adapter.block(0, traced).input.save()
                for layer in range(adapter.num_layers):
                    if want_mlp and layer in self.mlp_layers:
                        mlp_in.append(adapter.mlp(layer, traced).input.save())
                    if layer + 1 in self.resid_layers:
                        saved[layer + 1] = adapter.block(layer, traced).output.save()
                if head_path:
                    final.append(adapter.final_norm(traced).output.save())
                    tracer.stop()  # the unembedding runs below, on the positions scored only
                elif split == "wmdp":
                    logits = traced.output.logits
                    final.append(logits[rows, lengths - 1][:, self.letter_ids].float().save())
                elif split == "wmdp_cloze":
                    final.append(self._cloze_logprob(lambda r, p: traced.output.logits[r, p], ids, extra).save())
                else:
                    tracer.stop()  # forget / retain need no logits: skip the final norm and unembedding
            if head_path:
                final[0] = self._head_scores(final[0], split, rows, lengths, ids, extra)
            resid = [saved[layer] for layer in self.resid_layers]
            lengths_list = [int(n) for n in lengths.cpu()]
            index = self._token_index(lengths_list, ids.shape[1], positions)
            out = {}
            if "resid" in self.variables:
                out["resid"] = self._store(self._gather(resid, index), "resid")
            if want_mlp:
                out["mlp_in"] = self._store(self._gather(mlp_in, index), "mlp_in")
            out["last"] = self._store(torch.stack([h[rows, lengths - 1] for h in resid]).to(self.dtype), "last")
        if split == "wmdp":
            out["final_letter_logits"] = final[0].cpu().numpy().astype(np.float32)
        elif split == "wmdp_cloze":
            out["final_cloze_logprob"] = final[0].cpu().numpy().astype(np.float32)
        return out

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.store_dtype)

    def _token_index(self, lengths: list[int], width: int, positions: list[np.ndarray] | None):
        """Flat indices into (batch x width) of the kept tokens, sample after sample (on the device)."""
        import torch

        if positions is None:
            flat = [row * width + np.arange(length) for row, length in enumerate(lengths)]
        else:
            flat = [row * width + np.asarray(kept, dtype=np.int64) for row, kept in enumerate(positions)]
        return torch.from_numpy(np.concatenate(flat).astype(np.int64)).to(self.device)

    def _gather(self, states: list, index):
        """(layers, kept tokens, hidden) in the storage dtype: one gather and one cast per layer."""
        import torch

        hidden = states[0].shape[-1]
        out = torch.empty((len(states), len(index), hidden), dtype=self.dtype, device=states[0].device)
        for layer, state in enumerate(states):
            out[layer].copy_(state.reshape(-1, hidden).index_select(0, index))
        return out

    def _head_scores(self, normed, split: str, rows, lengths, ids, extra: dict[str, np.ndarray]):
        """The model's own letter logits or cloze log-probs from its final-norm output.

        Applies the unembedding to the scored positions only (what HF's ``logits_to_keep`` does):
        the full (batch, tokens, vocab) logits of a bare forward are never built.
        """
        head = self.adapter.unembed()
        if split == "wmdp":
            return head(normed[rows, lengths - 1])[:, self.letter_ids].float()
        return self._cloze_logprob(lambda r, p: head(normed[r, p]), ids, extra)

    def _cloze_logprob(self, logits_at: Callable, ids, extra: dict[str, np.ndarray]):
        """Mean log-prob of each continuation, from the model's own logits (SCHEMA.md).

        ``logits_at(rows, positions)`` gives the model's logits at those (row, position) pairs.
        """
        import torch

        starts = torch.as_tensor(extra["cont_start"], device=ids.device).long()
        ends = torch.as_tensor(extra["cont_end"], device=ids.device).long()
        counts = ends - starts
        row = torch.repeat_interleave(torch.arange(len(starts), device=ids.device), counts)
        within = torch.arange(int(counts.sum()), device=ids.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        target_pos = torch.repeat_interleave(starts, counts) + within
        logprobs = torch.log_softmax(logits_at(row, target_pos - 1).float(), dim=-1)
        picked = logprobs.gather(1, ids[row, target_pos].unsqueeze(1)).squeeze(1)
        return torch.zeros(len(starts), device=ids.device).index_add_(0, row, picked) / counts

    def _store(self, stored, name: str) -> np.ndarray:
        """Check a cast tensor: values the storage dtype cannot hold are an error, never stored as inf."""
        import torch

        low, high = torch.aminmax(stored)  # 10x faster than isfinite on float16; NaN propagates
        if not (torch.isfinite(low) and torch.isfinite(high)):
            if self.store_dtype == "float16" and not (torch.isnan(low) or torch.isnan(high)):
                raise UserError(
                    f"{name} activations exceed float16's range (65504); capture again with --dtype float32 "
                    "(add --overwrite to replace this partial cache)"
                )
            raise UserError(f"the model produced non-finite {name} activations (NaN or inf): check the model")
        return stored.cpu().numpy()
