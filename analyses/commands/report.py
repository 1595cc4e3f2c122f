"""`unlearn-lens report`: rebuild OUTDIR/report.html from the outputs already there (torch-free)."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.core.settings import DEFAULT_OUTDIR


@click.command("report")
@options.outdir(default=DEFAULT_OUTDIR, must_exist=True,
                help="Output root holding <base>__to__<name>/ and <model>/ folders.")
def report(outdir: str) -> None:
    """Rebuild the self-contained HTML report (plots and mechanistic-signature table)."""
    from analyses.report import discover, write_report

    click.echo(f"wrote {write_report(discover(outdir))}")
