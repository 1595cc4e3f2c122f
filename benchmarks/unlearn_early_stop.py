"""RMU step time with the forward pass cut after the target layer vs the full forward pass.

Representation methods (rmu, cb) need hidden states up to the target layer only; on one process
the trainer stops each forward there (``hooks.StopForward``). Baseline: the same RMU loss and
backward with full forward passes (logits and all later blocks), measured in the same run.
Usage: python benchmarks/unlearn_early_stop.py [--layers 24] [--hidden 256] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from unlearn_lens.architectures import ArchitectureAdapter
from unlearn_lens.testing import make_tiny_model
from unlearn_lens.unlearning.config import UnlearnConfig
from unlearn_lens.unlearning.methods import MethodContext, Reference, build_method


def time_steps(ctx, batch, steps: int) -> float:
    method = build_method(ctx)
    loss, _ = method.loss(batch, batch, 0)  # warm-up
    loss.backward()
    start = time.perf_counter()
    for step in range(steps):
        loss, _ = method.loss(batch, batch, step)
        loss.backward()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layer-id", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = make_tiny_model("llama", layers=args.layers, hidden=args.hidden, heads=8)
    frozen = copy.deepcopy(model).requires_grad_(False)
    cfg = UnlearnConfig("tiny", "-", "-", "rmu", layer_id=args.layer_id)
    cfg.resolve_layers(args.layers)
    batch = tokenizer(["The cell membrane controls what enters and leaves the cell. " * 8] * 8,
                      truncation=True, max_length=128, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    results = {}
    for early in (False, True):
        ctx = MethodContext(cfg, model, ArchitectureAdapter(model), 100,
                            Reference(frozen, ArchitectureAdapter(frozen)), plain_model=model,
                            hidden_size=args.hidden, early_stop=early)
        results[early] = time_steps(ctx, batch, args.steps)
    print(f"llama {args.layers} layers, hidden {args.hidden}, target layer {args.layer_id}, batch 8x128")
    print(f"full forward (baseline): {results[False] * 1000:.1f} ms/step")
    print(f"cut after target layer:  {results[True] * 1000:.1f} ms/step")
    print(f"speed-up: {results[False] / results[True]:.2f}x")


if __name__ == "__main__":
    main()
