"""`unlearn-lens capture`: record a model's activations on the data splits into a Zarr cache."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.core.settings import CACHE_CODECS, CACHE_DTYPES, CAPTURE_MAX_SAMPLES
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
@click.option("--layers", default=None, metavar="SPEC",
              help="Residual layers to record (default: all 0..L): a list 0,8,16, ranges 0-8, every:K, combined "
                   "with commas. The final layer L is always kept; MLP inputs are kept at the chosen layers below L.")
@click.option("--token-sample", type=int, default=None, metavar="K",
              help="Record K seeded positions per text of the token-level arrays (default: every token). The last "
                   "token and the positions WMDP cloze scores are always kept; 'last', the logits and the token "
                   "ids stay complete.")
@options.seed(help="Seed of --token-sample's positions (drawn per text, the same in every model).")
@click.option("--variables", default="resid,mlp_in", show_default=True,
              help="Token-level arrays to record: resid, mlp_in ('last' is always recorded).")
@click.option("--codec", type=click.Choice(list(CACHE_CODECS)), default=CACHE_CODECS[0], show_default=True,
              help="Chunk codec: zstd1 saves ~9 % on float16 and costs writer CPU; none only checksums (choose it "
                   "where cores, not the disk, bound the capture).")
@click.option("--writer-threads", type=int, default=None,
              help="Threads compressing and writing chunks (default: 1 on a CPU device, where they run at a lower "
                   "priority than the forward; every core but one on a GPU node, at most 16).")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the cache's size per split and array, the free space at --out and whether the forward "
                   "or the writing bounds the capture, from the config and tokenizer alone (no weights); "
                   "write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def capture(model_spec, revision, arch_spec, trust_remote_code, data_dir, out, splits, max_samples, max_length,
            batch_size, dtype, model_dtype, device, shard, overwrite, block_samples, layers, token_sample, seed,
            variables, codec, writer_threads, plan_only, quiet) -> None:
    """Run the model once per batch and record residuals, MLP inputs, last-token states and
    WMDP logits into a resumable Zarr cache (killed at any time, rerun the same command).

    A capture whose cache would not fit the free space at --out refuses to start (before loading
    the model) and names the flags (--layers, --token-sample, --variables) that would make it fit."""
    from unlearn_lens.capture import CaptureRun, CaptureSettings, Selection, plan_only as make_plan, run_capture
    from unlearn_lens.capture.inputs import parse_splits
    from unlearn_lens.capture.selection import parse_variables
    from unlearn_lens.core.settings import ModelRef

    settings = CaptureSettings(
        splits=tuple(parse_splits(splits)), max_samples=max_samples, max_length=max_length,
        batch_size=batch_size, dtype=dtype, model_dtype=model_dtype, device=device,
        shard=_parse_shard(shard), overwrite=overwrite, block_samples=block_samples, progress=not quiet,
        selection=Selection(layers=layers, token_sample=token_sample, variables=parse_variables(variables), seed=seed),
        codec=codec, writer_threads=writer_threads,
    )
    if plan_only:
        plan = make_plan(model_spec, data_dir, out, settings, revision=revision, trust_remote_code=trust_remote_code)
        for line in plan.lines():
            click.echo(line)
        return
    states = run_capture(CaptureRun(ModelRef(model_spec, revision, arch_spec, trust_remote_code), data_dir, out,
                                    settings))
    for split, state in states.items():
        click.echo(f"{split}: {state}")
    click.echo(f"cache: {out}")
