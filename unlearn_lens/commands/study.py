"""`unlearn-lens study`: do the signatures predict recovery? Unlearn at several strengths, measure, predict."""

from __future__ import annotations

from pathlib import Path

import click

from unlearn_lens import options
from unlearn_lens.study import DEFAULT_METHODS, DEFAULT_STRENGTHS, STRENGTH_KNOBS, StudySettings

SKIPPABLE = ("capture", "params", "analyze", "lipschitz", "tuned-lens", "report")


def _list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _strengths(text: str) -> tuple[float, ...]:
    from unlearn_lens.core.errors import UserError

    try:
        return tuple(float(part) for part in _list(text))
    except ValueError:
        raise UserError(f"--strengths {text!r}: expected comma-separated numbers, e.g. 0.5,1,2") from None


def _skip(text: str) -> frozenset[str]:
    from unlearn_lens.core.errors import UserError

    names = frozenset(_list(text))
    if names - set(SKIPPABLE):
        raise UserError(f"--skip: unknown step(s) {', '.join(sorted(names - set(SKIPPABLE)))}; "
                        f"choose from {', '.join(SKIPPABLE)}")
    return names


KNOBS_HELP = "; ".join(f"{method}: {knob}" for method, knob in STRENGTH_KNOBS.items())


@click.command("study")
@options.model(help="Base model to unlearn: hub id, local HF directory or .gguf file.")
@options.revision()
@options.data(help="Data directory (`unlearn-lens datasets create`, e.g. the planted-facts testbed): unlearning "
                   "trains on its forget texts, every measurement reads its held-out texts and questions.")
@options.outdir(help="Output root: OUT/unlearning/<model>/, one comparison OUT/base__to__<model>/ per model, "
                     "OUT/study/ and OUT/report.html.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help="Unlearning methods (comma-separated, at least two: each is held out in turn).")
@click.option("--strengths", default=",".join(f"{s:g}" for s in DEFAULT_STRENGTHS), show_default=True,
              help="Multipliers of each method's strength knob, light to strong (three or more for the study's "
                   f"claim). The knob per method: {KNOBS_HELP}; its base value is the demo's setting (--preset "
                   "original) or the preset's.")
@click.option("--lora/--full", "lora", default=None,
              help="Train every method with LoRA adapters, or every parameter (default: as each method's reference "
                   "preset trains: LoRA for cb, cb_lat and lat, full otherwise; wt_dist and wt_dist_reg are always "
                   "full).")
@click.option("--preset", default="original", show_default=True,
              help="original: the demo's per-method settings (sized for SmolLM2 on CPU; on a planted-facts testbed, the "
                   "demo's testbed settings for rmu and ga); reference or default: "
                   "`unlearn --preset` (steps, batch size, length and seed stay the demo's).")
@click.option("--unlearn-steps", type=int, default=None, help="Training steps of every unlearning run.")
@click.option("--attacks", "attacks_text", default="", help="Comma-separated attacks (default: every attack).")
@click.option("--attack-samples", type=int, default=StudySettings.attack_max_samples, show_default=True,
              help="Texts and questions each attack evaluation reads (at most --max-samples).")
@options.device(help="Torch device for every model step (cpu, cuda, cuda:1...).")
@options.max_samples(StudySettings.max_samples, help="Texts per split (and questions) captured and analysed.")
@options.max_length(StudySettings.max_length, help="Tokens per text (longer texts are truncated).")
@options.batch_size(StudySettings.batch_size, help="Texts per forward pass during capture.")
@options.force(help="Redo unlearning runs and steps that are already complete.")
@click.option("--skip", default="", help=f"Comma-separated steps to leave out: {', '.join(SKIPPABLE)}.")
@click.option("--workers", type=int, default=None, help="Parallel workers for params and analyze.")
@click.option("--lipschitz-samples", type=int, default=StudySettings.lipschitz_samples, show_default=True,
              help="Texts per split for the Lipschitz step.")
@click.option("--tuned-lens-steps", type=int, default=StudySettings.tuned_lens_steps, show_default=True,
              help="Training steps of each tuned lens.")
@click.option("--tuned-lens-tokens", type=int, default=StudySettings.tuned_lens_tokens, show_default=True,
              help="Tokens per tuned-lens training step.")
def study(model_spec, revision, data_dir, outdir, methods, strengths, lora, preset, unlearn_steps, attacks_text,
          attack_samples, device, max_samples, max_length, batch_size, force, skip, workers, lipschitz_samples,
          tuned_lens_steps, tuned_lens_tokens) -> None:
    """Do the signatures predict recovery? Unlearn --model with each method at each strength, measure every
    unlearned model, and predict each attack's recovery leave-one-method-out.

    Each model <method>-x<strength> is a comparison base__to__<model> in OUTDIR: captures, params,
    analyze, Lipschitz, tuned lens and the attacks (direction ablation, int8/int4 quantization,
    relearning controls; each recovery with its 95% interval, the setting chosen on half the evaluation
    items and scored on the other half). OUTDIR/study/ then holds signatures.csv, recovery.csv,
    prediction.csv (per recovery target: Spearman and out-of-sample R^2 of the held-out predictions from
    the signatures, from the behavioural effect alone and from the training mean, with intervals, and
    whether the signatures beat each), predictions.csv and prediction.png; the report gains a study
    section. Everything resumes: rerun the same command.
    """
    from unlearn_lens.commands.pipeline import _finish
    from unlearn_lens.study import run_study

    settings = StudySettings(
        model=model_spec, revision=revision, data=Path(data_dir), outdir=Path(outdir), methods=_list(methods),
        strengths=_strengths(strengths), training=None if lora is None else ("lora" if lora else "full"),
        preset=preset, unlearn_steps=unlearn_steps, device=device, max_samples=max_samples, max_length=max_length,
        batch_size=batch_size, force=force, skip=_skip(skip), workers=workers, lipschitz_samples=lipschitz_samples,
        tuned_lens_steps=tuned_lens_steps, tuned_lens_tokens=tuned_lens_tokens, attacks=_list(attacks_text),
        attack_max_samples=attack_samples)
    status = run_study(settings)
    click.echo(f"\nStudy tables: {Path(outdir) / 'study'}; report: {Path(outdir) / 'report.html'}")
    _finish(status)
