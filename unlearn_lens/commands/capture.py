"""`unlearn-lens capture`: record a model's activations on the data splits into a Zarr cache."""

from __future__ import annotations

import click

from unlearn_lens.core.errors import UserError


def _parse_shard(value: str | None) -> tuple[int, int]:
    if not value:
        return 1, 1
    try:
        k, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise UserError(f"--shard {value!r}: expected K/N, e.g. 1/2") from None
    if n < 1 or not 1 <= k <= n:
        raise UserError(f"--shard {value}: need 1 <= K <= N")
    return k, n


@click.command("capture")
@click.option("--model", "model_spec", required=True, help="Hub id, local HF model directory or .gguf file.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Data directory (forget.txt, retain.txt, wmdp_mcq.jsonl; manifest.json from `datasets create`, "
                   "or, without it, the files' SHA-256 identifies the data).")
@click.option("--out", required=True, help="Cache location: a directory or any fsspec URL (s3://..., memory://...).")
@click.option("--splits", default="forget,retain,wmdp", show_default=True,
              help="Comma-separated splits to capture; wmdp also captures wmdp_cloze.")
@click.option("--max-samples", default=500, show_default=True, type=int,
              help="First N texts (forget/retain) or questions (wmdp) of each split.")
@click.option("--max-length", default=512, show_default=True, type=int,
              help="Truncate each sample to this many tokens (prompts keep their end).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Samples per forward pass.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Storage dtype of activations (float16 halves the cache; out-of-range values are an error).")
@click.option("--model-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Compute dtype of the model (auto: float32 on CPU, bfloat16 on GPU).")
@click.option("--device", default="cpu", show_default=True, help="Torch device to run the model on (cpu, cuda, cuda:1...).")
@click.option("--shard", default=None, metavar="K/N",
              help="Fill only the K-th of N chunk-aligned parts; run N processes on the same --out.")
@click.option("--overwrite", is_flag=True,
              help="Replace a cache at --out captured with other provenance (model, data or settings).")
@click.option("--block-samples", default=32, show_default=True, type=int,
              help="Samples per block: the unit of resumption and of sharding.")
@click.option("--arch-spec", default=None, type=click.Path(dir_okay=False),
              help="JSON architecture description for a model outside the known families.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (off by default).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def capture(model_spec, revision, data_dir, out, splits, max_samples, max_length, batch_size, dtype,
            model_dtype, device, shard, overwrite, block_samples, arch_spec, trust_remote_code, quiet) -> None:
    """Run the model once per batch and record residuals, MLP inputs, last-token states and
    WMDP logits into a resumable Zarr cache (killed at any time, rerun the same command)."""
    from unlearn_lens.capture import CaptureSettings, capture as run_capture
    from unlearn_lens.capture_inputs import parse_splits

    settings = CaptureSettings(
        splits=tuple(parse_splits(splits)), max_samples=max_samples, max_length=max_length,
        batch_size=batch_size, dtype=dtype, model_dtype=model_dtype, device=device,
        shard=_parse_shard(shard), overwrite=overwrite, block_samples=block_samples, progress=not quiet,
    )
    states = run_capture(model_spec, data_dir, out, settings, revision=revision, arch_spec=arch_spec,
                         trust_remote_code=trust_remote_code)
    for split, state in states.items():
        click.echo(f"{split}: {state}")
    click.echo(f"cache: {out}")
