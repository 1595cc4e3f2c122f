"""The torch-free core both sides stand on: errors, naming, model specs, atomic writes, the output tree.

It imports nothing else of the project and no heavy library, so ``cache_store/`` and
``analyses/`` (which import only this core from ``unlearn_lens``) run on nodes without torch.
An import-linter contract in ``pyproject.toml`` (checked by ``tests/test_layers.py``) keeps it so.
"""
