#!/usr/bin/env bash
# The GPU check: a random-init deep-ignorance (Pythia-6.9B) model on one GPU, nothing downloaded:
# capture vs a bare forward (and at --layers every:4 --token-sample 64, with the writer's ingestion),
# params on two checkpoints, 20 steps of rmu and of cb_lat (LoRA), two-process FSDP when two GPUs
# are present. Prints one summary table; exits non-zero if a step fails. Under 10 minutes on one
# H200 (about 90 GB of disk at most is never held: outputs are deleted as the check goes).
# GPU_CHECK_CONFIG=tiny runs the same steps on a tiny model on the CPU.
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine, after scripts/install.sh
#   GPU_CHECK_CONFIG=tiny bash benchmarks/gpu_check.sh
#   GPU_CHECK_DIR=/scratch/gc bash benchmarks/gpu_check.sh   # keep checkpoints and outputs there
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 benchmarks/gpu_check.py "$@"
