"""The HTML report: one self-contained page with every plot and the mechanistic-signature table.

Reads only the CSV / JSON / PNG outputs of the other steps (torch-free, names from
``unlearn_lens.core.outputs``), so it can be rebuilt anywhere. Missing diagnostics show as a dash,
never as an error: a report of a partial run is still useful. Along the data flow:

- ``inputs``: where the outputs live (``ReportInputs``, ``discover``) and the readers;
- ``stats``: finite floats, mean / median, Spearman ρ, and numbers as text;
- ``signatures``: one extractor per signature row, ``signature_table``;
- ``recovery``: the signature beside relearning's measured recovery (table, figure);
- ``recoverability``: the signature beside what the attacks bring back;
- ``html``: style, tables, embedded figures, a section with its empty state;
- ``page``: ``render_report`` and ``write_report``.
"""

from analyses.report.inputs import ReportInputs, discover, read_json, read_rows
from analyses.report.page import render_report, write_report
from analyses.report.recoverability import best_recovery, recoverability_section, recoverability_table
from analyses.report.recovery import recovery_section, recovery_steps, recovery_table
from analyses.report.signatures import RECOVERY_PREDICTORS, SIGNATURE, evaluation_for, signature_table
from analyses.report.stats import NEEDS_THREE, fmt, spearman_text

__all__ = ["NEEDS_THREE", "RECOVERY_PREDICTORS", "SIGNATURE", "ReportInputs", "best_recovery", "discover",
           "evaluation_for", "fmt", "read_json", "read_rows", "recoverability_section", "recoverability_table",
           "recovery_section", "recovery_steps", "recovery_table", "render_report", "signature_table",
           "spearman_text", "write_report"]
