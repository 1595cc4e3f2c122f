"""`unlearn-lens capture`: record a model's activations on the data splits into a Zarr cache."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.core.settings import CACHE_DTYPES, CAPTURE_MAX_SAMPLES
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
@options.model_side(with_arch_spec=True)
@options.data(must_exist=True,
              help="Data directory (forget.txt, retain.txt, wmdp_mcq.jsonl; manifest.json from `datasets create`, "
                   "or, without it, the files' SHA-256 identifies the data).")
@click.option("--out", required=True, help="Cache location: a directory or any fsspec URL (s3://..., memory://...).")
@click.option("--splits", default="forget,retain,wmdp", show_default=True,
              help="Comma-separated splits to capture; wmdp also captures wmdp_cloze.")
@options.max_samples(CAPTURE_MAX_SAMPLES, help="First N texts (forget/retain) or questions (wmdp) of each split.")
@options.max_length(help="Truncate each sample to this many tokens (prompts keep their end).")
@options.batch_size(help="Samples per forward pass.")
@options.dtype(CACHE_DTYPES[0], choices=CACHE_DTYPES,
               help="Storage dtype of activations (float16 halves the cache; out-of-range values are an error).")
@options.dtype(name="--model-dtype", param="model_dtype",
               help="Compute dtype of the model (auto: float32 on CPU, bfloat16 on GPU).")
@options.device()
@click.option("--shard", default=None, metavar="K/N",
              help="Fill only the K-th of N chunk-aligned parts; run N processes on the same --out.")
@options.overwrite(help="Replace a cache at --out captured with other provenance (model, data or settings).")
@click.option("--block-samples", default=32, show_default=True, type=int,
              help="Samples per block: the unit of resumption and of sharding.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def capture(model_spec, revision, arch_spec, trust_remote_code, data_dir, out, splits, max_samples, max_length,
            batch_size, dtype, model_dtype, device, shard, overwrite, block_samples, quiet) -> None:
    """Run the model once per batch and record residuals, MLP inputs, last-token states and
    WMDP logits into a resumable Zarr cache (killed at any time, rerun the same command)."""
    from unlearn_lens.capture import CaptureRun, CaptureSettings, run_capture
    from unlearn_lens.capture_inputs import parse_splits
    from unlearn_lens.core.settings import ModelRef

    settings = CaptureSettings(
        splits=tuple(parse_splits(splits)), max_samples=max_samples, max_length=max_length,
        batch_size=batch_size, dtype=dtype, model_dtype=model_dtype, device=device,
        shard=_parse_shard(shard), overwrite=overwrite, block_samples=block_samples, progress=not quiet,
    )
    states = run_capture(CaptureRun(ModelRef(model_spec, revision, arch_spec, trust_remote_code), data_dir, out,
                                    settings))
    for split, state in states.items():
        click.echo(f"{split}: {state}")
    click.echo(f"cache: {out}")
