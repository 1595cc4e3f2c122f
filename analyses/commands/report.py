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
    from analyses.report.inputs import unfinished_folders

    inputs = discover(outdir)
    skipped = unfinished_folders(inputs)
    if skipped:
        click.echo(f"skipped {len(skipped)} folder(s) not marked complete: "
                   + ", ".join(str(folder.relative_to(inputs.root)) for folder in skipped), err=True)
    click.echo(f"wrote {write_report(inputs)}")
