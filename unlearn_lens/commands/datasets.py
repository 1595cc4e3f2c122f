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
@click.option("--facts", type=int, default=None,
              help="Write the planted-facts testbed instead (offline): N fictitious people drawn from --seed, each "
                   "with a birthplace, an occupation and an instrument from closed sets. forget.txt: the training "
                   "texts of half of them (A, in halves A1 / A2 by person); retain.txt: those of the others (B) and "
                   "general passages; wmdp_mcq.jsonl / retain_mcq.jsonl: one 4-choice question per fact of A / B in "
                   "a held-out template no training text contains; dev_mcq.jsonl (plant's stopping rule); "
                   "facts.jsonl; manifest.json records generator, seed and split. Plant the facts with "
                   "`unlearn-lens plant`.")
@options.seed(help="Seed of the held-out split (with --facts: of the people, their facts and the questions).")
def create(outdir: str, demo: bool, source_dir: str | None, eval_fraction: float, forget_corpus: bool,
           max_retain: int | None, facts: int | None, seed: int) -> None:
    """Write the data sets and a manifest (sources, counts, content hash, held-out split)."""
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.data import DatasetSettings, run_datasets

    if demo and source_dir:
        raise UserError("--demo and --source-dir exclude each other")
    if facts is not None and (demo or source_dir or forget_corpus or max_retain is not None):
        raise UserError("--facts writes the planted-facts testbed: it takes no --demo, --source-dir, --forget-corpus "
                        "or --max-retain")
    source = "testbed" if facts is not None else "demo" if demo else "local" if source_dir else "hub"
    manifest = run_datasets(DatasetSettings(outdir, source=source, source_dir=source_dir, eval_fraction=eval_fraction,
                                            seed=seed, forget_corpus=forget_corpus, max_retain=max_retain,
                                            facts=facts))
    counts = manifest["counts"]
    retain_questions = f", retain questions {counts['retain_eval']}" if "retain_eval" in counts else ""
    click.echo(f"wrote {outdir}: forget {counts['forget']}, retain {counts['retain']}, "
               f"held-out questions {counts['wmdp_eval']}{retain_questions} (manifest hash {manifest['hash'][:12]})")


@datasets.command("info")
@click.argument("data_dir", type=click.Path())
def info(data_dir: str) -> None:
    """Print a data directory's manifest (without the per-question id lists)."""
    from unlearn_lens.data import read_manifest

    manifest = read_manifest(data_dir)
    split = dict(manifest.get("heldout_split", {}))
    split.pop("eval_ids", None), split.pop("train_ids", None)
    click.echo(json.dumps({**manifest, "heldout_split": split}, indent=2))
