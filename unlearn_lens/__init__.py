"""unlearn-lens: what did unlearning actually do to this model?

This package runs models (loading, architectures, data, capture, unlearning, live diagnostics).
Importing the package itself stays light: heavy libraries (torch, transformers, nnsight) are
imported by the submodules that need them, so the torch-free core (`unlearn_lens.core`: errors,
naming, model specs, atomic writes) can be used by `cache_store` and `analyses` on nodes without torch.
"""

__version__ = "0.1.0"
