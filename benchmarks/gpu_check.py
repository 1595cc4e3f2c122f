"""The GPU check: the deep-ignorance (Pythia-6.9B) shape end to end on one GPU, nothing downloaded.

Steps (each timed; one summary table at the end; exit status 1 if any step failed):

1. write two random-init checkpoints of the config in bfloat16 (the second with a planted rank-4
   change in one MLP matrix), with the local test tokenizer (unlearn_lens.testing);
2. capture vs a bare HF forward with ``output_hidden_states`` on the same batches
   (``bench_capture.measure_capture``): wall-time ratio and the writer's ingestion (GB/s of
   activations taken in); then the same at the recommended setting (``--layers every:4
   --token-sample 64``, README "Sharing caches"): ratio, ingestion and the bytes stored;
3. ``unlearn-lens params --steps stats`` on the two checkpoints: time, peak RSS, and the planted
   change found (the only matrix with a nonzero dW, stable rank <= 4);
4. 20 steps of ``unlearn --method rmu`` in float32 master weights with bf16 autocast;
5. 20 steps of ``unlearn --method cb_lat --lora`` likewise. Full-parameter cb_lat does not fit one
   H200: float32 weights + gradients + two AdamW moments of 6.9B parameters are 110 GB before the
   frozen reference copy (27.6 GB) and activations, so the adapters train (LoRA) and the base is frozen;
6. two-process FSDP rmu (``accelerate launch --config_file docs/accelerate/fsdp.yaml``) when two
   GPUs are present, else skipped with a line saying so.

``GPU_CHECK_CONFIG=tiny`` (or ``--config tiny``) runs the same steps on a tiny GPT-NeoX on the CPU:
what the test suite runs so the script cannot rot.

    bash benchmarks/gpu_check.sh            # one GPU, under 10 minutes on an H200
    GPU_CHECK_CONFIG=tiny bash benchmarks/gpu_check.sh
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

#: GPT-NeoX configs: EleutherAI/deep-ignorance-unfiltered (Pythia-6.9B shape) and a CPU-sized one
CONFIGS = {
    "deep-ignorance": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=16384,
                           vocab_size=50304, rotary_pct=0.25, use_parallel_residual=True,
                           max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                 vocab_size=512, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=256),
}
#: per config: texts and tokens per text for capture and unlearning, unlearning steps
SIZES = {"deep-ignorance": dict(texts=64, max_length=256, steps=20, batch_size=4, repeats=2),
         "tiny": dict(texts=8, max_length=32, steps=3, batch_size=2, repeats=1)}  # steps: a smoke run
PLANTED_RANK = 4

# run a CLI command and report its peak memory (own RSS and its children's, CUDA allocator peak)
_CLI_WITH_PEAKS = """
import atexit, json, resource, sys
sys.path.insert(0, {repo!r})
def _peaks():
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    gpu = 0
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.max_memory_allocated()
    print("GPU_CHECK_PEAKS " + json.dumps({{"rss_kb": rss, "gpu_bytes": gpu}}), file=sys.stderr)
atexit.register(_peaks)
import cli
cli.main(sys.argv[1:])
"""


class Step:
    """One row of the summary: name, status, wall seconds, peak memory and a note."""

    def __init__(self, name: str):
        self.name, self.status, self.seconds, self.memory, self.note = name, "not run", 0.0, "", ""


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def run_cli(args: list[str], step: Step, env: dict | None = None, launcher: list[str] | None = None,
            timeout: int = 600) -> None:
    """Run ``unlearn-lens ARGS`` in a fresh process (or under ``launcher``); fill ``step``."""
    command = [*(launcher or [sys.executable, "-c", _CLI_WITH_PEAKS.format(repo=str(REPO))]), *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=str(REPO), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)})
    step.seconds = time.perf_counter() - start
    peaks = [json.loads(line.split(" ", 1)[1]) for line in result.stderr.splitlines()
             if line.startswith("GPU_CHECK_PEAKS ")]
    if peaks:
        rss, gpu = max(p["rss_kb"] for p in peaks) * 1024, max(p["gpu_bytes"] for p in peaks)
        step.memory = f"RSS {gib(rss)}" + (f", GPU {gib(gpu)}" if gpu else "")
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("GPU_CHECK_PEAKS")]
        raise RuntimeError(f"exit {result.returncode}: {last[-1] if last else ''}")


def write_checkpoints(config_name: str, device: str, work: Path) -> tuple[Path, Path, str]:
    """Two bf16 checkpoints of the config: ``a`` random-init, ``b`` = ``a`` + a rank-4 change in the
    middle block's MLP up-projection. Returns their paths and the changed parameter's name."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from unlearn_lens.testing import build_tokenizer

    tokenizer = build_tokenizer()
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    config = GPTNeoXConfig(**CONFIGS[config_name], tie_word_embeddings=False, **special)
    assert len(tokenizer) <= config.vocab_size
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    paths = work / "model_a", work / "model_b"
    model.save_pretrained(paths[0])
    tokenizer.save_pretrained(paths[0])
    layer = config.num_hidden_layers // 2
    name = f"gpt_neox.layers.{layer}.mlp.dense_h_to_4h.weight"
    weight = model.get_parameter(name)
    generator = torch.Generator(device=device).manual_seed(1)
    left = torch.randn(weight.shape[0], PLANTED_RANK, device=device, generator=generator)
    right = torch.randn(PLANTED_RANK, weight.shape[1], device=device, generator=generator)
    with torch.no_grad():
        weight.add_((0.05 * left @ right / PLANTED_RANK ** 0.5).to(weight.dtype))
    model.save_pretrained(paths[1])
    tokenizer.save_pretrained(paths[1])
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return paths[0], paths[1], name


#: The recommended capture setting at 6.9B (README, "Sharing caches"; benchmarks/bench_capture_scale.py).
RECOMMENDED = {"layers": "every:4", "token_sample": 64}


def capture_note(result: dict, step: Step) -> str:
    """capture / bare forward, and the writer's ingestion: activation bytes taken in per second."""
    bare, captured = min(t[0] for t in result["bare"]), min(t[0] for t in result["capture"])
    step.seconds = step.seconds + sum(t[0] for key in ("bare", "trace", "capture") for t in result[key])
    stored = result["report"]["bytes_stored"]
    return (f"capture/bare {captured / bare:.2f} ({captured:.2f} s vs {bare:.2f} s, {result['tokens']} tokens); "
            f"ingestion {result['ingested'] / captured / 1e9:.2f} GB/s with {result['writer_threads']} writer "
            f"thread(s), {stored / 1e9:.2f} GB stored")


def capture_vs_bare(model_path: Path, device: str, sizes: dict, step: Step, state: dict) -> None:
    """Capture path vs a bare forward with every hidden state, same batches (bench_capture); then the
    same at the recommended setting, kept in ``state`` for its own step."""
    import torch

    from bench_capture import build_texts, measure_capture
    from unlearn_lens.capture import Selection
    from unlearn_lens.loading import load_model

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_model(str(model_path), dtype="bfloat16", device=device)
    result = measure_capture(model, tokenizer, str(model_path), build_texts(sizes["texts"]), split="forget",
                             batch_size=8, max_length=sizes["max_length"], repeats=sizes["repeats"])
    step.memory = f"GPU {gib(torch.cuda.max_memory_allocated())}" if device == "cuda" else ""
    step.note = capture_note(result, step)
    recommended = Selection(**RECOMMENDED)
    state["recommended"] = measure_capture(model, tokenizer, str(model_path), build_texts(sizes["texts"]),
                                           split="forget", batch_size=8, max_length=sizes["max_length"],
                                           repeats=sizes["repeats"], selection=recommended)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def check_planted_change(outdir: Path, changed: str) -> str:
    """The per-matrix CSV names the planted matrix alone, with a stable rank at most the planted rank."""
    with open(outdir / "param_stats" / "per_matrix.csv") as handle:
        rows = list(csv.DictReader(handle))
    moved = [row for row in rows if float(row["dW_fro"]) > 0]
    if [row["name"] for row in moved] != [changed]:
        raise RuntimeError(f"expected only {changed} to change, found {[row['name'] for row in moved][:5]}")
    stable_rank = float(moved[0]["dW_stable_rank"])
    if not 1 <= stable_rank <= PLANTED_RANK + 1e-6:
        raise RuntimeError(f"planted rank-{PLANTED_RANK} change has stable rank {stable_rank:.2f}")
    return f"{len(rows)} matrices; planted change found (stable rank {stable_rank:.2f})"


def unlearn_args(method: str, model: Path, data: Path, out: Path, device: str, sizes: dict) -> list[str]:
    """``unlearn`` for ``steps`` steps: float32 master weights, bf16 autocast on the GPU."""
    precision = ["--dtype", "float32", "--mixed-precision", "bf16" if device == "cuda" else "no"]
    return ["unlearn", "--method", method, "--model", str(model), "--data", str(data), "--outdir", str(out),
            "--steps", str(sizes["steps"]), "--batch-size", str(sizes["batch_size"]),
            "--max-length", str(sizes["max_length"]), "--max-samples", str(4 * sizes["batch_size"]),
            "--eval-every", str(sizes["steps"]), "--device", device, *precision, "--no-progress"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default=os.environ.get("GPU_CHECK_CONFIG", "deep-ignorance"),
                        help="deep-ignorance (one GPU) or tiny (CPU smoke run); env GPU_CHECK_CONFIG")
    parser.add_argument("--workdir", default=os.environ.get("GPU_CHECK_DIR"),
                        help="where checkpoints and outputs go (default: a temporary folder, removed at the end)")
    args = parser.parse_args()

    import torch

    device = "cpu" if args.config == "tiny" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run GPU_CHECK_CONFIG=tiny for the CPU smoke run", file=sys.stderr)
        return 2
    sizes = SIZES[args.config]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    print(f"gpu_check: config {args.config} ({CONFIGS[args.config]['num_hidden_layers']} layers, hidden "
          f"{CONFIGS[args.config]['hidden_size']}), device {device}"
          + (f" ({torch.cuda.get_device_name(0)}, {gpus} GPU(s))" if device == "cuda" else "")
          + f", torch {torch.__version__}, work {work}", flush=True)
    steps: list[Step] = []
    state: dict = {}

    def attempt(name: str, body) -> None:
        step = Step(name)
        steps.append(step)
        start = time.perf_counter()
        print(f"... {name}", flush=True)
        try:
            note = body(step)
            step.status, step.note = "ok", note or step.note
        except Exception as exc:  # noqa: BLE001 - every step is reported, the check goes on
            step.status = "FAILED"
            step.note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        step.seconds = step.seconds or time.perf_counter() - start

    def checkpoints(step: Step) -> str:
        from unlearn_lens.data import create_datasets

        state["a"], state["b"], state["changed"] = write_checkpoints(args.config, device, work)
        state["data"] = work / "data"
        create_datasets(state["data"], source="demo")
        size = sum(p.stat().st_size for p in state["a"].glob("*.safetensors"))
        return f"bf16, {gib(size)} each; demo data"

    def params(step: Step) -> str:
        out = work / "params"
        run_cli(["params", "--model-a", str(state["a"]), "--model-b", str(state["b"]), "--outdir", str(out),
                 "--steps", "stats", "--workers", str(min(8, os.cpu_count() or 1))], step)
        return check_planted_change(out, state["changed"])

    def unlearn(method: str, lora: bool):
        def body(step: Step) -> str:
            out = work / f"unlearn-{method}"
            run_cli(unlearn_args(method, state["a"], state["data"], out, device, sizes) + (["--lora"] if lora else []),
                    step)
            with open(out / "train_log.csv") as handle:
                losses = [float(row["loss"]) for row in csv.DictReader(handle)]
            shutil.rmtree(out / "model", ignore_errors=True)  # 27 GB in float32: free the disk for the next step
            if len(losses) != sizes["steps"] or not all(math.isfinite(x) for x in losses):
                raise RuntimeError(f"train_log.csv: {len(losses)} steps, losses {losses[:3]}...")
            return f"loss {losses[0]:.4g} -> {losses[-1]:.4g} in {len(losses)} steps" + (" (LoRA)" if lora else "")
        return body

    def recommended_capture(step: Step) -> str:
        if "recommended" not in state:
            raise RuntimeError("not measured: the full capture step failed first")
        return capture_note(state["recommended"], step)

    def fsdp(step: Step) -> str:
        out = work / "unlearn-rmu-fsdp"
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "docs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", str(REPO / "cli.py")]
        args_ = unlearn_args("rmu", state["a"], state["data"], out, "cuda", sizes)
        args_[args_.index("--dtype") + 1] = "bfloat16"  # as docs/accelerate/fsdp.yaml says for 7B
        run_cli(args_, step, launcher=launcher)
        shutil.rmtree(out / "model", ignore_errors=True)
        return "2 processes, sharded"

    attempt("write checkpoints", checkpoints)
    if "a" in state:
        attempt("capture vs bare forward", lambda step: capture_vs_bare(state["a"], device, sizes, step, state))
        attempt("capture at --layers every:4 --token-sample 64", recommended_capture)
        attempt("params (2 checkpoints)", params)
        shutil.rmtree(state["b"], ignore_errors=True)
        attempt(f"unlearn rmu ({sizes['steps']} steps)", unlearn("rmu", lora=False))
        attempt(f"unlearn cb_lat --lora ({sizes['steps']} steps)", unlearn("cb_lat", lora=True))
        if gpus >= 2:
            attempt("FSDP rmu, 2 processes", fsdp)
        else:
            skipped = Step("FSDP rmu, 2 processes")
            skipped.status, skipped.note = "skipped", f"needs 2 GPUs, {gpus} present"
            steps.append(skipped)
            print(f"FSDP skipped: needs 2 GPUs, {gpus} present")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(s.name) for s in steps)
    print(f"\n{'step':{width}s}  {'status':7s}  {'time':>8s}  {'peak memory':24s}  note")
    for s in steps:
        print(f"{s.name:{width}s}  {s.status:7s}  {s.seconds:7.1f}s  {s.memory:24s}  {s.note}")
    failed = [s.name for s in steps if s.status == "FAILED"]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
