"""The HTML report: one self-contained page with every plot and the mechanistic-signature table.

Reads only the CSV / JSON / PNG outputs of the other steps (torch-free), so it can be rebuilt
anywhere. Plots are embedded as base64 data URIs: the page is a single file that opens offline.
Missing diagnostics show as a dash, never as an error: a report of a partial run is still useful.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from analyses.io import atomic_write_text
from unlearn_lens.core import outputs

COMPARISON_FOLDERS = outputs.COMPARISON_FOLDERS
MODEL_FOLDERS = outputs.MODEL_FOLDERS


@dataclass
class ReportInputs:
    """Where the outputs live: ``root/<base>__to__<name>/`` and ``root/<model>/``."""

    root: Path
    base: str
    comparisons: list[str]  # names of the modified models
    steps: dict[str, str] = field(default_factory=dict)  # pipeline step -> status

    def comparison_dir(self, name: str) -> Path:
        return outputs.comparison_dir(self.root, self.base, name)

    def model_dir(self, name: str) -> Path:
        return outputs.model_dir(self.root, name)


# --- small readers ---------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _floats(rows: Sequence[dict], column: str, where: Callable[[dict], bool] = lambda r: True) -> list[float]:
    values = []
    for row in rows:
        if where(row):
            try:
                value = float(row[column])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(value):
                values.append(value)
    return values


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def fmt(value: float | None, digits: int = 3) -> str:
    """Numbers for people: 3 significant digits, scientific when tiny or huge, a dash when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


# --- the mechanistic signature -----------------------------------------------------------------

Extractor = Callable[[ReportInputs, str], str]


def _matrix_rows(inputs: ReportInputs, name: str) -> list[dict]:
    return read_rows(inputs.comparison_dir(name) / outputs.PARAM_STATS / "per_matrix.csv")


def relative_update(inputs: ReportInputs, name: str) -> str:
    rows = _matrix_rows(inputs, name)
    dw, w = _floats(rows, "dW_fro"), _floats(rows, "W_fro")
    return fmt(math.sqrt(sum(x * x for x in dw)) / math.sqrt(sum(x * x for x in w))) if dw and w else fmt(None)


def max_spectral_rel(inputs: ReportInputs, name: str) -> str:
    values = _floats(_matrix_rows(inputs, name), "dW_spectral_rel")
    return fmt(max(values) if values else None)


def mlp_energy_share(inputs: ReportInputs, name: str) -> str:
    """MLP share of the block matrices' update energy (embedding rows, group ``embed``, left out)."""
    rows = _matrix_rows(inputs, name)
    mlp = sum(x * x for x in _floats(rows, "dW_fro", lambda r: r.get("group") == "mlp"))
    total = sum(x * x for x in _floats(rows, "dW_fro", lambda r: r.get("group") in ("mlp", "attn")))
    return fmt(mlp / total) if total > 0 else fmt(None)


def top_layers(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.PARAM_STATS / "per_layer.csv")
    energy: dict[int, float] = {}
    for row in rows:
        try:
            layer, value = int(row["layer"]), float(row["dW_fro_layer"])
        except (KeyError, ValueError):
            continue
        if layer >= 0:
            energy[layer] = energy.get(layer, 0.0) + value * value
    ranked = [layer for layer, value in sorted(energy.items(), key=lambda kv: -kv[1]) if value > 0][:3]
    return ", ".join(str(layer) for layer in ranked) if ranked else fmt(None)


def _changed(row: dict) -> bool:
    """Rows of matrices the intervention touched: geometry of an unchanged matrix is not defined."""
    try:
        return float(row.get("dW_fro", "nan")) > 0
    except ValueError:
        return False


def _column_stat(folder: str, filename: str, column: str, stat=_median, where=_changed) -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        return fmt(stat(_floats(read_rows(inputs.comparison_dir(name) / folder / filename), column, where)))
    return extract


def grassmann(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.NULL_SPACE / "null_space_results.csv")
    return fmt(_mean(_floats(rows, "left_grassmann_distance", _changed) + _floats(rows, "right_grassmann_distance", _changed)))


def dh_forget_over_retain(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.ACTIVATION_STATS / "activation_stats.csv")
    forget = _mean(_floats(rows, "mean_dh_L2", lambda r: r.get("split") == "forget"))
    retain = _mean(_floats(rows, "mean_dh_L2", lambda r: r.get("split") == "retain"))
    if forget is None or retain is None:
        return fmt(None)
    return f"{fmt(forget)} / {fmt(retain)}"


def row_space_selectivity(inputs: ReportInputs, name: str) -> str:
    """Mean forget/retain energy ratio over every row of ``row_space_projection.csv`` with a finite one:
    the row space of the matrices that read the stream (MLP inputs) and the column space of those
    that write into it (residual after the block), so an update of down-projections only gets a value."""
    summary = read_json(inputs.comparison_dir(name) / outputs.ROW_SPACE / "summary.json")
    return fmt((summary.get("mean_selectivity_ratio") or {}).get(inputs.base))


def separation_auc_change(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.SEPARATION / "separation_metrics.csv")
    base = _mean(_floats(rows, "auc", lambda r: r.get("model") == inputs.base))
    modified = _mean(_floats(rows, "auc", lambda r: r.get("model") == name))
    return fmt(modified - base) if base is not None and modified is not None else fmt(None)


def lipschitz_ratio(split: str) -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        rows = read_rows(inputs.comparison_dir(name) / outputs.LIPSCHITZ / "lipschitz_results.csv")
        eps = _floats(rows, "eps")
        if not eps:
            return fmt(None)
        smallest = min(eps)

        def pick(model):
            return _mean(_floats(rows, "lipschitz_logits_mean", lambda r: r.get("model") == model and
                                 r.get("split") == split and float(r.get("eps", "nan")) == smallest))
        base, modified = pick(inputs.base), pick(name)
        return fmt(modified / base) if base and modified is not None else fmt(None)
    return extract


def _before_after(base_value: float | None, value: float | None) -> str:
    if base_value is None and value is None:
        return fmt(None)
    return f"{fmt(base_value)} → {fmt(value)}"


def probe_selectivity(inputs: ReportInputs, name: str) -> str:
    def best(model):
        return read_json(inputs.model_dir(model) / outputs.PROBES / "summary.json").get("best_selectivity")
    return _before_after(best(inputs.base), best(name))


def lens_best(folder: str, scoring: str = "cloze") -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        def best(model):
            rows = read_rows(inputs.model_dir(model) / folder / "wmdp_lens_results.csv")
            values = _floats(rows, "accuracy", lambda r: r.get("scoring") == scoring)
            return max(values) if values else None
        return _before_after(best(inputs.base), best(name))
    return extract


def lens_final(folder: str, scoring: str = "cloze") -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        def final(model):
            rows = [r for r in read_rows(inputs.model_dir(model) / folder / "wmdp_lens_results.csv")
                    if r.get("scoring") == scoring]
            rows.sort(key=lambda r: int(r.get("layer", -1)))
            return _floats(rows[-1:], "accuracy")[0] if rows and _floats(rows[-1:], "accuracy") else None
        return _before_after(final(inputs.base), final(name))
    return extract


def evaluation_for(inputs: ReportInputs, name: str) -> dict:
    """Before/after evaluation of an unlearning run made by this tool, if there is one."""
    for path in (inputs.root / outputs.UNLEARNING / name / "eval.json", inputs.model_dir(name) / outputs.EVALUATION / "eval.json"):
        data = read_json(path)
        if data:
            return data
    return {}


def behaviour(metric: str) -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        data = evaluation_for(inputs, name)
        before, after = (data.get("before") or {}).get(metric), (data.get("after") or {}).get(metric)
        return _before_after(before, after) if data else fmt(None)
    return extract


SIGNATURE: list[tuple[str, str, Extractor]] = [
    ("Magnitude", "relative update ‖ΔW‖F / ‖W‖F, all matrices", relative_update),
    ("Magnitude", "largest relative spectral norm σ1(ΔW)/σ1(W)", max_spectral_rel),
    ("Location", "MLP share of update energy (rest: attention)", mlp_energy_share),
    ("Location", "layers with the largest change", top_layers),
    ("Geometry", "median stable rank of ΔW (changed matrices)", _column_stat(outputs.PARAM_STATS, "per_matrix.csv", "dW_stable_rank")),
    ("Geometry", "median empirical rank of ΔW (99% energy, changed matrices)",
     _column_stat(outputs.PARAM_STATS, "per_matrix.csv", "dW_empirical_rank")),
    ("Geometry", "top-10 singular values' share of ΔW energy (sampled, changed)",
     _column_stat(outputs.NULL_SPACE, "null_space_results.csv", "top10_energy_share", _mean)),
    ("Geometry", "null-space share of MLP updates (output side, changed)",
     _column_stat(outputs.MLP_NULLSPACE, "mlp_nullspace.csv", "col_null_share", _mean)),
    ("Geometry", "Grassmann distance of top-k singular subspaces (mean, changed)", grassmann),
    ("Activation change", "mean ‖Δh‖2 forget / retain", dh_forget_over_retain),
    ("Selectivity", "covariance Wasserstein selectivity W(forget)/W(retain)",
     _column_stat(outputs.COVARIANCE, "covariance_selectivity.csv", "selectivity_ratio", _median,
                   lambda r: True)),
    ("Selectivity", "row/column-space selectivity (forget/retain energy where ΔW reads or writes)", row_space_selectivity),
    ("Selectivity", "forget/retain separation AUC, modified − base", separation_auc_change),
    ("Stability", "local Lipschitz (logits) modified/base, forget", lipschitz_ratio("forget")),
    ("Stability", "local Lipschitz (logits) modified/base, retain", lipschitz_ratio("retain")),
    ("Knowledge depth", "best probe selectivity, base → modified", probe_selectivity),
    ("Knowledge depth", "logit lens cloze accuracy, best layer", lens_best(outputs.LOGIT_LENS)),
    ("Knowledge depth", "logit lens cloze accuracy, final layer", lens_final(outputs.LOGIT_LENS)),
    ("Knowledge depth", "tuned lens cloze accuracy, best layer", lens_best(outputs.TUNED_LENS)),
    ("Behaviour", "forget NLL before → after unlearning", behaviour("forget_nll")),
    ("Behaviour", "retain NLL before → after unlearning", behaviour("retain_nll")),
    ("Behaviour", "WMDP cloze accuracy before → after", behaviour("cloze_accuracy")),
]


def signature_table(inputs: ReportInputs) -> list[dict[str, str]]:
    """Rows of the signature table: question, metric, then one value per comparison."""
    return [{"question": question, "metric": label, **{name: extract(inputs, name) for name in inputs.comparisons}}
            for question, label, extract in SIGNATURE]


# --- brittleness: the signature beside measured recovery (relearning) ----------------------------

#: (short column name, SIGNATURE label) of the signature metrics set beside the measured recovery.
RECOVERY_PREDICTORS: list[tuple[str, str]] = [
    ("update norm", "relative update ‖ΔW‖F / ‖W‖F, all matrices"),
    ("stable rank", "median stable rank of ΔW (changed matrices)"),
    ("null-space share", "null-space share of MLP updates (output side, changed)"),
    ("row-space selectivity", "row/column-space selectivity (forget/retain energy where ΔW reads or writes)"),
    ("probe depth", "best probe selectivity, base → modified"),
    ("logit-lens depth", "logit lens cloze accuracy, best layer"),
    ("tuned-lens depth", "tuned lens cloze accuracy, best layer"),
]
NEEDS_THREE = "needs >= 3 comparisons"


def relearning_summary(inputs: ReportInputs, name: str) -> dict:
    return read_json(inputs.model_dir(name) / outputs.RELEARNING / "summary.json")


def _signature_number(text: str) -> float | None:
    """The modified model's value in an extractor's text ("x" or "base → x"); None for a dash."""
    try:
        value = float(text.split("→")[-1].strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def recovery_steps(summary: dict, metric: str | None = None) -> tuple[float | None, str]:
    """(value used for ranking, text shown) of the forget attack's steps to half recovery.

    Never reached within the run ranks above every reached value (censored at steps + 1); no gap
    to recover gives None (left out of the correlation).
    """
    metric = metric or summary.get("steps_to_half_recovery_metric") or "cloze_accuracy"
    entry = ((summary.get("recovery") or {}).get("forget") or {}).get(metric)
    if not entry:
        return None, fmt(None)
    if entry.get("reached") and entry.get("steps_to_half") is not None:
        return float(entry["steps_to_half"]), str(entry["steps_to_half"])
    gap = entry.get("gap")
    if gap is not None and gap > 0:
        steps = int((summary.get("settings") or {}).get("steps") or 0)
        return float(steps + 1), f"> {steps}"
    return None, "no gap"


def spearman_text(xs: Sequence[float | None], ys: Sequence[float | None]) -> str:
    """Spearman ρ over the comparisons that have both values; a note when fewer than three."""
    import warnings

    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3:
        return NEEDS_THREE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    rho, p_value = float(result.statistic), float(result.pvalue)
    if not math.isfinite(rho):
        return f"— (constant, n = {len(pairs)})"
    return f"ρ = {rho:.2f} (p = {fmt(p_value, 2)}, n = {len(pairs)})"


def recovery_table(inputs: ReportInputs) -> tuple[list[dict[str, str]], list[str]]:
    """Rows (one per comparison, then one Spearman row per recovery measure) and the columns."""
    extractors = {label: extract for _, label, extract in SIGNATURE}
    names = inputs.comparisons
    predictor_values = {short: [_signature_number(extractors[label](inputs, n)) for n in names]
                        for short, label in RECOVERY_PREDICTORS}
    predictor_text = {short: [extractors[label](inputs, n) for n in names] for short, label in RECOVERY_PREDICTORS}
    summaries = [relearning_summary(inputs, n) for n in names]
    accuracy = [recovery_steps(s) for s in summaries]
    nll = [recovery_steps(s, "forget_nll") for s in summaries]
    metric = next((s.get("steps_to_half_recovery_metric") for s in summaries if s), "cloze_accuracy")
    acc_column = f"steps to half recovery ({metric.replace('_', ' ')})"
    nll_column = "steps to half recovery (forget NLL)"
    columns = ["comparison", *[short for short, _ in RECOVERY_PREDICTORS], acc_column, nll_column]
    rows = []
    for index, name in enumerate(names):
        row = {"comparison": f"{inputs.base} → {name}", acc_column: accuracy[index][1], nll_column: nll[index][1]}
        row.update({short: predictor_text[short][index] for short, _ in RECOVERY_PREDICTORS})
        rows.append(row)
    for label, target in ((f"Spearman ρ with {acc_column}", accuracy), (f"Spearman ρ with {nll_column}", nll)):
        row = {"comparison": label, acc_column: "", nll_column: ""}
        row.update({short: spearman_text(predictor_values[short], [t[0] for t in target])
                    for short, _ in RECOVERY_PREDICTORS})
        rows.append(row)
    return rows, columns


def recovery_figure(inputs: ReportInputs) -> str:
    """Scatter of each signature metric against steps to half recovery, as an embedded PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extractors = {label: extract for _, label, extract in SIGNATURE}
    names = inputs.comparisons
    steps = [recovery_steps(relearning_summary(inputs, n))[0] for n in names]
    columns = 4
    panel_rows = math.ceil(len(RECOVERY_PREDICTORS) / columns)
    figure, axes = plt.subplots(panel_rows, columns, figsize=(4 * columns, 3.4 * panel_rows), squeeze=False)
    for axis, (short, label) in zip(axes.flat, RECOVERY_PREDICTORS):
        xs = [_signature_number(extractors[label](inputs, n)) for n in names]
        points = [(x, y, n) for x, y, n in zip(xs, steps, names) if x is not None and y is not None]
        for x, y, n in points:
            axis.scatter(x, y, color="tab:red")
            axis.annotate(n, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if not points:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey")
        axis.set(xlabel=short, ylabel="steps to half recovery",
                 title=f"{short}: {spearman_text(xs, steps)}")
        axis.title.set_fontsize(9)
    for axis in list(axes.flat)[len(RECOVERY_PREDICTORS):]:
        axis.set_visible(False)
    figure.suptitle("Mechanistic signature vs measured recovery under relearning")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<figure style="max-width:100%"><img alt="signature vs recovery" src="data:image/png;base64,{data}">'
            "<figcaption>signature vs steps to half recovery (never reached: ranked above every reached "
            "value)</figcaption></figure>")


def recovery_section(inputs: ReportInputs) -> str:
    """The brittleness section: signature beside measured recovery, with Spearman correlations."""
    head = ("<h2 id='recovery'>Brittleness: signature vs measured recovery</h2><p class='muted'>A fine-tuning "
            "attack (plain NLL descent on a few forget texts, `unlearn-lens relearn`) measures how many steps "
            "recover half of the gap to the base model. Fewer steps = more brittle. Spearman ρ across "
            "comparisons asks whether each signature metric predicts it (never reached: ranked above every "
            "reached value; no gap: left out).</p>")
    if not any(relearning_summary(inputs, n) for n in inputs.comparisons):
        return head + ("<p class='muted'>No relearning results yet: run `unlearn-lens relearn` per model, or the "
                       "pipeline with --relearn.</p>")
    rows, columns = recovery_table(inputs)
    return head + _table(rows, columns) + f"<div class='figs'>{recovery_figure(inputs)}</div>"


# --- recoverability: what the attacks bring back (`unlearn-lens attack`) ---------------------------

#: Attacks in the order the table shows them (others found in attacks.csv follow, sorted).
ATTACK_ORDER = ("ablate", "quantize", "relearn-unrelated", "relearn-heldout")
#: (attacks.csv metric, label) of the recoverability table.
RECOVERABILITY_METRICS = (("cloze_accuracy", "cloze accuracy"), ("forget_nll", "forget NLL"))


def attack_rows(inputs: ReportInputs, name: str) -> list[dict[str, str]]:
    return read_rows(inputs.model_dir(name) / outputs.ATTACKS / "attacks.csv")


def best_recovery(rows: Sequence[dict], attack: str, metric: str) -> tuple[float | None, str]:
    """(largest finite ``recovery_<metric>`` of ``attack``'s rows on the modified model, its setting)."""
    best, setting = None, ""
    for row in rows:
        if row.get("attack") == attack and row.get("target") == "modified":
            values = _floats([row], f"recovery_{metric}")
            if values and (best is None or values[0] > best):
                best, setting = values[0], row.get("setting", "")
    return best, setting


def _attacks_present(per_model: Sequence[Sequence[dict]]) -> list[str]:
    found = {row.get("attack", "") for rows in per_model for row in rows if row.get("attack")}
    return [a for a in ATTACK_ORDER if a in found] + sorted(found - set(ATTACK_ORDER))


def recoverability_table(inputs: ReportInputs) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """(rows attack x metric with one best-recovery cell per comparison, Spearman rows, Spearman columns).

    A cell reads "best (setting)"; the Spearman rows correlate each signature metric of
    ``RECOVERY_PREDICTORS`` with each best recovery across comparisons.
    """
    names = inputs.comparisons
    per_model = [attack_rows(inputs, n) for n in names]
    extractors = {label: extract for _, label, extract in SIGNATURE}
    table, recoveries = [], {}
    for attack in _attacks_present(per_model):
        for metric, label in RECOVERABILITY_METRICS:
            best = [best_recovery(rows, attack, metric) for rows in per_model]
            recoveries[f"{attack}: {label}"] = [value for value, _ in best]
            table.append({"attack": attack, "metric": f"best recovery of {label}",
                          **{n: fmt(value) + (f" ({setting})" if value is not None and setting else "")
                             for n, (value, setting) in zip(names, best)}})
    columns = ["signature metric", *recoveries]
    spearman = []
    for short, label in RECOVERY_PREDICTORS:
        xs = [_signature_number(extractors[label](inputs, n)) for n in names]
        spearman.append({"signature metric": short,
                         **{column: spearman_text(xs, ys) for column, ys in recoveries.items()}})
    return table, spearman, columns


def recoverability_section(inputs: ReportInputs) -> str:
    """The recoverability table (attack x model) and the Spearman ρ of each signature with each recovery."""
    head = ("<h2 id='recoverability'>Recoverability: what attacks bring back</h2><p class='muted'>Best recovery "
            "fraction per attack on the modified model, (attacked − modified) / (base − modified) on the same "
            "evaluation data: 0 = nothing recovered, 1 = back to the base model (`unlearn-lens attack`: direction "
            "ablation, int8/int4 quantization, relearning on unrelated text and on held-out facts; the setting "
            "that recovered most in brackets; — where base and modified do not differ). Below: Spearman ρ of "
            "each signature metric with each best recovery across comparisons.</p>")
    if not any(attack_rows(inputs, n) for n in inputs.comparisons):
        return head + ("<p class='muted'>No attack results yet: run `unlearn-lens attack` per model "
                       "(--outdir OUT --name NAME), or the pipeline with --attacks.</p>")
    table, spearman, columns = recoverability_table(inputs)
    return (head + _table(table, ["attack", "metric", *inputs.comparisons], group_column="attack")
            + _table(spearman, columns))


# --- HTML ---------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1.5rem;color:#1d232a}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #e3e7ec;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.92rem} th,td{border:1px solid #d5dbe1;padding:.35rem .6rem;text-align:left}
th{background:#f1f4f7} td.num{font-variant-numeric:tabular-nums;text-align:right} tr.group td{background:#fafbfc;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0;max-width:48%} figure img{max-width:100%;border:1px solid #e3e7ec}
figcaption{font-size:.8rem;color:#5b6670} .muted{color:#5b6670} .bad{color:#b42318} details{margin:.6rem 0}
nav a{margin-right:1rem}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(f"{path.parent.name}/{path.name}")
    return f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def _figures(directory: Path, folders: Sequence[str]) -> str:
    parts = []
    for folder in folders:
        pngs = sorted((directory / folder).glob("*.png"))
        if pngs:
            parts.append(f"<h3>{html.escape(folder)}</h3><div class='figs'>{''.join(_img(p) for p in pngs)}</div>")
    return "".join(parts) or "<p class='muted'>No plots yet.</p>"


def _table(rows: list[dict[str, str]], columns: Sequence[str], group_column: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns if c != group_column)
    body, group = [], None
    for row in rows:
        if group_column and row[group_column] != group:
            group = row[group_column]
            body.append(f"<tr class='group'><td colspan='{len(columns) - 1}'>{html.escape(group)}</td></tr>")
        cells = "".join(f"<td class='{'num' if i else ''}'>{html.escape(str(row.get(c, '')))}</td>"
                        for i, c in enumerate(c for c in columns if c != group_column))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML string."""
    rows = signature_table(inputs)
    names = inputs.comparisons
    nav = "".join(f"<a href='#cmp-{html.escape(n)}'>{html.escape(inputs.base)} → {html.escape(n)}</a>" for n in names)
    sections = [
        f"<h1>unlearn-lens report</h1><p class='muted'>Base model <b>{html.escape(inputs.base)}</b>; "
        f"compared with {', '.join(f'<b>{html.escape(n)}</b>' for n in names)}.</p><nav>{nav}</nav>",
        "<h2 id='signature'>Mechanistic signature</h2><p class='muted'>Each column is one intervention "
        "(base → model). Read down a column for its signature, across a row to compare interventions. "
        "A brittle, shallow edit tends to be small, low-rank, attention-localised, null-space aligned, "
        "with little activation change and knowledge still readable at intermediate layers.</p>",
        _table(rows, ["question", "metric", *names], group_column="question"),
        recoverability_section(inputs),
        recovery_section(inputs),
    ]
    if inputs.steps:
        step_rows = [{"step": k, "status": v} for k, v in inputs.steps.items()]
        failed = [r for r in step_rows if not r["status"].startswith(("done", "skipped"))]
        sections.append(f"<details{' open' if failed else ''}><summary>Pipeline steps "
                        f"({len(failed)} not finished)</summary>{_table(step_rows, ['step', 'status'])}</details>")
    for name in names:
        sections.append(f"<h2 id='cmp-{html.escape(name)}'>{html.escape(inputs.base)} → {html.escape(name)}</h2>")
        sections.append(_figures(inputs.comparison_dir(name), COMPARISON_FOLDERS))
    for model in [inputs.base, *names]:
        sections.append(f"<h2 id='model-{html.escape(model)}'>Model {html.escape(model)}</h2>")
        sections.append(_figures(inputs.model_dir(model), MODEL_FOLDERS))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>unlearn-lens report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>")


def write_report(inputs: ReportInputs, path: str | Path | None = None) -> Path:
    """Write ``report.html`` (default ``inputs.root/report.html``) atomically; returns its path."""
    target = Path(path) if path else inputs.root / outputs.REPORT
    atomic_write_text(target, render_report(inputs))
    return target


def discover(root: str | Path) -> ReportInputs:
    """Find the comparisons under ``root`` from its ``<base>__to__<name>`` folders."""
    from unlearn_lens.core.errors import UserError

    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    pairs = [pair for pair in map(outputs.parse_comparison_name, folders) if pair is not None]
    bases = {base for base, _ in pairs}
    if not pairs:
        raise UserError(f"{root}: no <base>__to__<name> folders to report on")
    if len(bases) > 1:
        raise UserError(f"{root}: several bases ({', '.join(sorted(bases))}); keep one study per output folder")
    return ReportInputs(root, bases.pop(), [name for _, name in pairs])
