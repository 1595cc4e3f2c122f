"""The whole page: ``render_report`` puts the sections in order, ``write_report`` writes it atomically."""

from __future__ import annotations

import html
from pathlib import Path

from analyses.report.html import STYLE, figures, section, table
from analyses.report.inputs import ReportInputs, unfinished_folders
from analyses.report.recoverability import recoverability_section
from analyses.report.recovery import recovery_section
from analyses.report.signatures import signature_table
from analyses.report.testbed import testbed_section
from analyses.report.study import study_section
from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_write_text

SIGNATURE_INTRO = ("Each column is one intervention (base → model). Read down a column for its signature, across a "
                   "row to compare interventions. A brittle, shallow edit tends to be small, low-rank, "
                   "attention-localised, null-space aligned, with little activation change and knowledge still "
                   "readable at intermediate layers.")


SKIPPED_INTRO = ("These folders are not marked complete (their step is still running, was stopped, or is being "
                 "recomputed from other inputs), so nothing in them is shown; rerun their step to include them.")


def _steps(steps: dict[str, str]) -> str:
    """The pipeline's step statuses, folded unless one did not finish."""
    rows = [{"step": k, "status": v} for k, v in steps.items()]
    failed = [r for r in rows if not r["status"].startswith(("done", "skipped"))]
    return (f"<details{' open' if failed else ''}><summary>Pipeline steps ({len(failed)} not finished)</summary>"
            f"{table(rows, ['step', 'status'])}</details>")


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML string."""
    names = inputs.comparisons
    base = html.escape(inputs.base)
    nav = "".join(f"<a href='#cmp-{html.escape(n)}'>{base} → {html.escape(n)}</a>" for n in names)
    signature = table(signature_table(inputs), ["question", "metric", *names], group_column="question")
    sections = [
        f"<h1>unlearn-lens report</h1><p class='muted'>Base model <b>{base}</b>; "
        f"compared with {', '.join(f'<b>{html.escape(n)}</b>' for n in names)}.</p><nav>{nav}</nav>",
        testbed_section(inputs),
        section("signature", "Mechanistic signature", SIGNATURE_INTRO, signature),
        recoverability_section(inputs),
        recovery_section(inputs),
        study_section(inputs),
    ]
    if inputs.steps:
        sections.append(_steps(inputs.steps))
    skipped = unfinished_folders(inputs)
    if skipped:
        sections.append(section("skipped", "Left out", SKIPPED_INTRO, table(
            [{"folder": str(folder.relative_to(inputs.root))} for folder in skipped], ["folder"])))
    for name in names:
        sections.append(f"<h2 id='cmp-{html.escape(name)}'>{base} → {html.escape(name)}</h2>")
        sections.append(figures(inputs.comparison_dir(name), outputs.COMPARISON_FOLDERS))
    for model in [inputs.base, *names]:
        sections.append(f"<h2 id='model-{html.escape(model)}'>Model {html.escape(model)}</h2>")
        sections.append(figures(inputs.model_dir(model), outputs.MODEL_FOLDERS))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>unlearn-lens report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")


def write_report(inputs: ReportInputs, path: str | Path | None = None) -> Path:
    """Write ``report.html`` (default ``inputs.root/report.html``) atomically; returns its path."""
    target = Path(path) if path else inputs.root / outputs.REPORT
    atomic_write_text(target, render_report(inputs))
    return target
