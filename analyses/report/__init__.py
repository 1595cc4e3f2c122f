"""The HTML report: one self-contained page with every plot and the mechanistic-signature table.

Reads only the CSV / JSON / PNG outputs of the other steps (torch-free, names from
``unlearn_lens.core.outputs``), so it can be rebuilt anywhere. Missing diagnostics show as a dash,
never as an error: a report of a partial run is still useful. Along the data flow:

- ``inputs``: where the outputs live (``ReportInputs``, ``discover``) and the readers;
- ``stats``: finite floats, mean / median, families of Spearman tests (exact p, Holm), numbers as text;
- ``signatures``: the tidy signature table (one reader per row, numbers), ``signature_frame`` and
  ``signature_table`` (its text);
- ``recovery``: the signature beside relearning's measured recovery (table, figure);
- ``recoverability``: the signature beside what the attacks bring back;
- ``testbed``: on the planted-facts testbed, what each model knows of the facts A and B, and A1 -> A2 relearning;
- ``study``: does a signature predict recovery? (OUT/study/ of `unlearn-lens study`);
- ``html``: style, tables, embedded figures, a section with its empty state;
- ``page``: ``render_report`` and ``write_report``.
"""

from analyses.report.inputs import ReportInputs, discover, read_json, read_rows
from analyses.report.page import render_report, write_report
from analyses.report.recoverability import (best_recovery, recoverability_correlations, recoverability_section,
                                            recoverability_table)
from analyses.report.recovery import recovery_correlations, recovery_section, recovery_steps, recovery_table
from analyses.report.signatures import (RECOVERY_PREDICTORS, SIGNATURE, SIGNATURE_COLUMNS, evaluation_for,
                                        signature_frame, signature_table)
from analyses.report.stats import NEEDS_THREE, fmt, spearman_cell, spearman_family

__all__ = ["NEEDS_THREE", "RECOVERY_PREDICTORS", "SIGNATURE", "SIGNATURE_COLUMNS", "ReportInputs", "best_recovery",
           "discover", "evaluation_for", "fmt", "read_json", "read_rows", "recoverability_correlations",
           "recoverability_section", "recoverability_table", "recovery_correlations", "recovery_section",
           "recovery_steps", "recovery_table", "render_report", "signature_frame", "signature_table",
           "spearman_cell", "spearman_family", "write_report"]
