"""`unlearn-lens datasets ...`: build and inspect the forget / retain / WMDP data."""

from __future__ import annotations

import json

import click

from unlearn_lens import options


@click.group("datasets")
def datasets() -> None:
    """Build and inspect the forget / retain / WMDP multiple-choice data sets."""


@datasets.command("create")
@options.outdir(help="Directory to write forget.txt, retain.txt, wmdp_mcq.jsonl and manifest.json to.")
@click.option("--demo", is_flag=True,
              help="Use the built-in offline demo set (original biology passages and questions, "
                   "general-knowledge retain passages) instead of the hub.")
@click.option("--source-dir", type=click.Path(), default=None,
              help="Build from local copies instead of the hub: wmdp_bio.jsonl|parquet and "
                   "wikitext.txt|parquet (plus forget_corpus.* with --forget-corpus).")
@click.option("--eval-fraction", type=float, default=0.5, show_default=True,
              help="Share of WMDP-Bio questions held out for evaluation; the rest become forget "
                   "training text. Ignored with --forget-corpus or --demo (all questions held out).")
@click.option("--forget-corpus", is_flag=True,
              help="Take forget training text from cais/wmdp-bio-forget-corpus (gated: needs HF_TOKEN) "
                   "and hold out every question.")
@click.option("--max-retain", type=int, default=None, help="Keep at most this many retain lines.")
@options.seed(help="Seed of the held-out split.")
def create(outdir: str, demo: bool, source_dir: str | None, eval_fraction: float, forget_corpus: bool,
           max_retain: int | None, seed: int) -> None:
    """Write the data sets and a manifest (sources, counts, content hash, held-out split)."""
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.data import DatasetSettings, run_datasets

    if demo and source_dir:
        raise UserError("--demo and --source-dir exclude each other")
    source = "demo" if demo else "local" if source_dir else "hub"
    manifest = run_datasets(DatasetSettings(outdir, source=source, source_dir=source_dir, eval_fraction=eval_fraction,
                                            seed=seed, forget_corpus=forget_corpus, max_retain=max_retain))
    counts = manifest["counts"]
    click.echo(f"wrote {outdir}: forget {counts['forget']}, retain {counts['retain']}, "
               f"held-out questions {counts['wmdp_eval']} (manifest hash {manifest['hash'][:12]})")


@datasets.command("info")
@click.argument("data_dir", type=click.Path())
def info(data_dir: str) -> None:
    """Print a data directory's manifest (without the per-question id lists)."""
    from unlearn_lens.data import read_manifest

    manifest = read_manifest(data_dir)
    split = dict(manifest.get("heldout_split", {}))
    split.pop("eval_ids", None), split.pop("train_ids", None)
    click.echo(json.dumps({**manifest, "heldout_split": split}, indent=2))
