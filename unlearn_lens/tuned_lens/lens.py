"""The tuned lens itself: per-layer affine translators over the model's own frozen readout.

``translator_l(h) = h + W_l h + b_l`` with ``W_l`` and ``b_l`` zero at initialisation, so an
untrained tuned lens *is* the logit lens; the readout is a float32 copy of the model's final norm
and unembedding. The torch module class is built on first use, so importing this module needs no
torch.
"""

from __future__ import annotations

import copy

import numpy as np

PARAMETRISATION = ("translator_l(h) = h + h @ weight[l].T + bias[l]; weight, bias zero at init; "
                   "layer L fixed at identity")


def _lens_module_class():
    import torch

    class TunedLens(torch.nn.Module):
        """Affine translators for layers 0..L-1 (layer L is the identity) plus a frozen readout."""

        def __init__(self, num_layers: int, hidden_size: int, final_norm, unembed):
            super().__init__()
            self.num_layers = int(num_layers)
            self.hidden_size = int(hidden_size)
            self.weight = torch.nn.Parameter(torch.zeros(num_layers, hidden_size, hidden_size))
            self.bias = torch.nn.Parameter(torch.zeros(num_layers, hidden_size))
            self.final_norm = copy.deepcopy(final_norm).float().requires_grad_(False)
            self.unembed = copy.deepcopy(unembed).float().requires_grad_(False)

        def translate(self, hidden, layer: int):
            """``h + W_l h + b_l`` (the identity at the last layer)."""
            if layer == self.num_layers:
                return hidden
            return hidden + hidden @ self.weight[layer].T + self.bias[layer]

        def readout(self, hidden):
            """The model's own final norm and unembedding (the logit lens)."""
            return self.unembed(self.final_norm(hidden))

        def forward(self, hidden, layer: int):
            return self.readout(self.translate(hidden.float(), layer))

        def translator_arrays(self) -> dict[str, np.ndarray]:
            """``weight`` (L+1, d, d) and ``bias`` (L+1, d) float32, the last layer's all zero."""
            weight = np.zeros((self.num_layers + 1, self.hidden_size, self.hidden_size), np.float32)
            bias = np.zeros((self.num_layers + 1, self.hidden_size), np.float32)
            weight[:-1] = self.weight.detach().float().cpu().numpy()
            bias[:-1] = self.bias.detach().float().cpu().numpy()
            return {"weight": weight, "bias": bias}

        def load_translator_arrays(self, arrays: dict[str, np.ndarray]) -> None:
            with torch.no_grad():
                self.weight.copy_(torch.from_numpy(np.asarray(arrays["weight"][:-1], np.float32)))
                self.bias.copy_(torch.from_numpy(np.asarray(arrays["bias"][:-1], np.float32)))

    return TunedLens


def make_tuned_lens(num_layers: int, hidden_size: int, final_norm, unembed):
    """A tuned lens at initialisation (identity translators) over the given readout modules."""
    return _lens_module_class()(num_layers, hidden_size, final_norm, unembed)


def lens_for_model(model, adapter):
    """A tuned lens at initialisation for an HF causal LM (float32 copies of its readout)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    return make_tuned_lens(adapter.num_layers, hidden, adapter.final_norm(), adapter.unembed())
