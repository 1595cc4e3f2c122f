"""The ablation attack's chosen layer and per-layer recovery for the models of a finished demo.

    python scripts/ablation_report.py outputs/demo            # after `unlearn-lens demo --outdir outputs/demo`

For each unlearned model of the demo (``OUT/unlearning/NAME/model``) this runs ``attack --attacks
ablate`` as the demo's pipeline would (its caches, data, dtype, batch and --max-samples), in modes
``single`` (k = 1, at the chosen layer only) and ``per_layer`` (k = 1), into
``OUT/ablation_report/NAME/attacks/`` (the demo's own ``attacks/`` folders are left as they are),
then prints a Markdown table: the chosen layer (largest mean difference relative to the base
residual's RMS), the layer the raw norm would have chosen, and each metric's recovery under
``per_layer`` and ``single`` with its 95 % interval (— where the gap it would close is inside the noise),
with the number of texts and questions evaluated. Costs about four
evaluations per model (unattacked pair, then each setting on the modified model and the base).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

REPORT_DIR = "ablation_report"
OPTIONS = {"ablate_modes": ("single", "per_layer"), "ablate_k": (1,), "ablate_top_layers": 1,
           "ablate_spread_layers": 0}
METRICS = ("forget_nll", "cloze_accuracy", "letter_accuracy", "retain_nll")


def demo_models(outdir: Path) -> list[str]:
    """Names of the unlearned models a demo run left in ``outdir``."""
    return sorted(path.parent.name for path in (outdir / "unlearning").glob("*/model") if path.is_dir())


def data_source(outdir: Path) -> str:
    """The demo's data source of a finished run: the testbed when it holds a planted model."""
    from unlearn_lens.core import outputs

    return "testbed" if (outdir / outputs.PLANTING / "model").is_dir() else "wmdp-demo"


def run(outdir: Path, methods: list[str]) -> list[dict]:
    """Run the ablation of every model; one summary dict per model."""
    from unlearn_lens.attacks.ablation import chosen_layer
    from unlearn_lens.attacks.options import typed_options
    from unlearn_lens.attacks.runner import run_attacks
    from unlearn_lens.demo import demo_settings
    from unlearn_lens.pipeline import attack_settings

    settings = demo_settings(outdir, ",".join(methods), data_source=data_source(outdir))
    report = outdir / REPORT_DIR
    rows = []
    for entry in settings.models:
        attack = dataclasses.replace(attack_settings(settings, entry), outdir=str(report), attacks=("ablate",),
                                     options=typed_options(OPTIONS, ("ablate",)))
        folder = run_attacks(attack)
        directions = dict(np.load(folder / "directions.npz"))
        raw = np.linalg.norm(directions["mean_diff"].astype(np.float64), axis=1)
        with open(folder / "attacks.csv", newline="") as handle:
            results = [r for r in csv.DictReader(handle) if r["target"] == "modified"]
        reference = json.loads((folder / "reference.json").read_text())["metrics"]["modified"]
        layer = chosen_layer(directions)
        rows.append({
            "model": entry.name, "layers": len(raw) - 1, "chosen_layer": layer, "raw_norm_layer": int(np.argmax(raw)),
            "relative_norm": float(directions["relative_norm"][layer]) if layer is not None else float("nan"),
            "fitted_tokens": int(directions["n_tokens"]), "fitted_texts": len(directions["fit_samples"]),
            "n_forget_texts": reference.get("n_forget_texts"), "n_questions": reference.get("n_questions"),
            **{f"{mode}_{m}{suffix}": value for mode in ("per_layer", "single") for m in METRICS
               for suffix, value in zip(("", "_low", "_high"), recovery(results, mode, m))}})
    return rows


def recovery(results: list[dict], mode: str, metric: str) -> tuple[float, float, float]:
    """``mode``'s recovery of ``metric`` and its 95 % interval (attacks.csv); nan where there is none."""
    from analyses.recovery import interval_columns, recovery_column

    column = recovery_column(metric)
    row = next((r for r in results if r["mode"] == mode), None)
    if row is None:
        return float("nan"), float("nan"), float("nan")
    return tuple(float(row.get(name) or "nan") for name in (column, *interval_columns(column)))


def estimate_text(row: dict, key: str) -> str:
    """``value [low, high]`` of one recovery, or ``—`` where it is undefined (a gap inside the noise)."""
    value, low, high = row[key], row.get(f"{key}_low", float("nan")), row.get(f"{key}_high", float("nan"))
    if not np.isfinite(value):
        return "—"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if np.isfinite(low) and np.isfinite(high) else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    head = ["model", "chosen layer (of L)", "raw-norm layer", "relative norm", "fitted texts / tokens",
            *[f"per_layer recovery {m}" for m in METRICS], *[f"single recovery {m}" for m in METRICS],
            "n texts / questions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['chosen_layer']} (of {r['layers']})", str(r["raw_norm_layer"]),
                 f"{r['relative_norm']:.3f}", f"{r['fitted_texts']} / {r['fitted_tokens']}",
                 *[estimate_text(r, f"per_layer_{m}") for m in METRICS],
                 *[estimate_text(r, f"single_{m}") for m in METRICS],
                 f"{r['n_forget_texts']} / {r['n_questions']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="the demo's --outdir (default of `unlearn-lens demo`: outputs/demo)")
    parser.add_argument("--methods", default="", help="comma-separated model names (default: every demo model)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m] or demo_models(args.outdir)
    if not methods:
        print(f"error: {args.outdir}: no unlearning/*/model folders (run `unlearn-lens demo` first)", file=sys.stderr)
        return 2
    rows = run(args.outdir, methods)
    (args.outdir / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    (args.outdir / REPORT_DIR / "ablation_report.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
