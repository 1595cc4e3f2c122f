"""Run the attacks of one comparison, resumably, and write ``OUT/NAME/attacks/``.

Every input is checked before a model loads. The unattacked base and modified models are
evaluated once (``reference.json``); each attack's results are stored in ``results/<attack>.json``
when it finishes, so an interrupted run redoes only unfinished attacks (``force`` redoes all
requested). ``attacks.csv``, ``summary.json`` and the plots are rebuilt from every stored result,
and the completion marker is written last.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

from analyses.uncertainty import PER_ITEM
from unlearn_lens.attacks.base import (ATTACKS, METRICS, NEEDS_CACHES, AttackContext, AttackSettings,
                                       attack_options, resolve_attack, timed)
from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.identity import inputs_record
from unlearn_lens.core.limits import check_counts

CSV_NAME = "attacks.csv"
RESULTS_DIR = "results"


def default_cache(outdir: str | Path, name: str, which: str) -> Path:
    """Where the pipeline puts a model's cache: ``OUT/caches/<name>.zarr`` (the base: ``base.zarr``)."""
    return outputs.cache_path(outdir, "base" if which == "base" else name)


def resolve_caches(settings: AttackSettings) -> AttackSettings:
    """Fill in the cache URLs (given, or where the pipeline puts them) and check them, in one line."""
    from cache_store import is_complete, open_caches

    urls = {}
    for which, given in (("base", settings.cache_base), ("modified", settings.cache_model)):
        url = given or str(default_cache(settings.outdir, settings.name, which))
        if not is_complete(url, "forget"):
            flag = "--cache-base" if which == "base" else "--cache-model"
            spec = settings.base if which == "base" else settings.model
            raise UserError(f"ablate needs the {which} model's activation cache: {url} has no complete forget "
                            f"split; pass {flag} URL or capture it with `unlearn-lens capture --model {spec} "
                            f"--data {settings.data} --out {url}`")
        urls[which] = url
    stacked = open_caches(urls, "forget")  # refuses caches of different tokens, in one line
    from unlearn_lens.data import data_hash

    expected = data_hash(settings.data, echo=lambda line: None)
    if stacked.attrs.get("data_manifest_hash") != expected:
        # ablation fits on the cached forget texts that the forget NLL does not measure: it must know which they are
        raise UserError(f"ablate: {urls['base']} was captured from other data than {settings.data} (data hash "
                        f"{str(stacked.attrs.get('data_manifest_hash'))[:12]} vs {expected[:12]}); capture the caches "
                        "from this --data")
    return dataclasses.replace(settings, cache_base=urls["base"], cache_model=urls["modified"])


def parse_options(settings: AttackSettings) -> None:
    """Refuse option keys that none of the requested attacks declares."""
    known = attack_options(settings.attacks)
    unknown = sorted(set(settings.options) - set(known))
    if unknown:
        raise UserError(f"unknown attack option(s) {', '.join(unknown)} for attacks {', '.join(settings.attacks)} "
                        f"(known: {', '.join(sorted(known)) or 'none'})")


def validate(settings: AttackSettings) -> AttackSettings:
    """Every check that needs no model; returns the settings with the caches resolved."""
    from unlearn_lens.core.outputs import check_model_name

    check_model_name(settings.name)
    check_counts(batch_size=settings.batch_size, max_length=settings.max_length, max_samples=settings.max_samples)
    checks = [(bool(settings.attacks), "--attacks is empty; choose from " + ", ".join(ATTACKS)),
              (len(set(settings.attacks)) == len(settings.attacks), f"--attacks repeats a name: {settings.attacks}")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for name in settings.attacks:
        resolve_attack(name)
    parse_options(settings)
    if not Path(settings.data).is_dir():
        raise UserError(f"{settings.data}: no such data directory (create one with `unlearn-lens datasets create`)")
    if NEEDS_CACHES & set(settings.attacks):
        settings = resolve_caches(settings)
    return settings


def _reference_key(settings: AttackSettings) -> dict:
    """What the reference evaluation (and so every stored result) depends on: the settings that decide
    it, and the identity of the models, the data's content and the caches (``core.identity``)."""
    from cache_store.identity import cache_identity

    s = settings
    caches = {role: cache_identity(url) for role, url in (("base", s.cache_base), ("model", s.cache_model)) if url}
    return {**{k: getattr(s, k) for k in ("base", "model", "base_revision", "model_revision", "data",
                                          "max_samples", "max_length", "dtype", "batch_size")},
            "inputs": inputs_record(models=[("base", s.base, s.base_revision), ("model", s.model, s.model_revision)],
                                    data=s.data, caches=caches)}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def reference_metrics(ctx: AttackContext, folder: Path, echo: Callable[[str], None]) -> dict:
    """Unattacked base and modified metrics, read from ``reference.json`` when still valid."""
    from analyses.io import atomic_write_json

    path = folder / "reference.json"
    key = _reference_key(ctx.settings)
    if path.is_file() and not ctx.settings.force:
        stored = _read_json(path)
        if stored.get("settings") == json.loads(json.dumps(key)):
            return stored["metrics"]
        echo("attack: settings changed since the stored results; recomputing them all")
        for stale in (folder / RESULTS_DIR).glob("*.json"):
            stale.unlink()
    metrics = {}
    for which in ("base", "modified"):
        def compute(which: str = which) -> dict:
            echo(f"attack: evaluating the unattacked {which} model")
            model, tokenizer = ctx.load(which)
            return ctx.evaluate(model, tokenizer)

        result, _ = ctx.memoised(which, None, compute, what=f"the unattacked {which} model")
        metrics[which] = {m: float(v) for m, v in result.items() if isinstance(v, (int, float))}
        metrics[which][PER_ITEM] = result.get(PER_ITEM)
    atomic_write_json(path, {"settings": key, "metrics": metrics})
    return metrics


def _result_path(folder: Path, attack: str) -> Path:
    return folder / RESULTS_DIR / f"{attack}.json"


def run_attacks(settings: AttackSettings, echo: Callable[[str], None] | None = None) -> Path:
    """Run every requested attack not yet done; write the CSV, summary, plots and marker; return the folder."""
    from analyses.io import atomic_write_json, clear_complete, is_complete, mark_complete

    echo = echo or (lambda message: print(message, file=sys.stderr))
    settings = validate(settings)
    folder = outputs.model_dir(settings.outdir, settings.name) / outputs.ATTACKS
    inputs = _reference_key(settings)
    pending = [a for a in settings.attacks if settings.force or not _result_path(folder, a).is_file()]
    if not pending and is_complete(folder, inputs):
        echo(f"attack: {', '.join(settings.attacks)} already done in {folder} (--overwrite to redo)")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    clear_complete(folder)
    if settings.force:
        for attack in settings.attacks:
            _result_path(folder, attack).unlink(missing_ok=True)
    ctx = AttackContext(settings, echo=echo)
    ctx.reference = reference_metrics(ctx, folder, echo)
    pending = [a for a in settings.attacks if not _result_path(folder, a).is_file()]
    for attack in pending:
        echo(f"attack: {attack}")
        run = resolve_attack(attack)
        results, seconds = timed(lambda: [r.record() for r in run(ctx)])
        atomic_write_json(_result_path(folder, attack), {"attack": attack, "seconds": seconds, "results": results})
    write_outputs(folder, settings, ctx.reference, echo)
    mark_complete(folder, {"step": "attack", "attacks": list(settings.attacks)}, inputs)
    return folder


def write_outputs(folder: Path, settings: AttackSettings, reference: dict, echo: Callable[[str], None]) -> None:
    """``attacks.csv``, ``headline.csv``, ``summary.json``, ``recovery.png`` and ``ablation_by_layer.png`` from
    the stored results."""
    from analyses.attack_plots import ablation_layer_plot, recovery_bar_plot
    from analyses.io import atomic_write_csv, atomic_write_json
    from analyses.recovery import (HEADLINE_COLUMNS, RECOVERY_EPS, best_by_metric, columns, headline_rows,
                                   recovery_rows)
    from analyses.uncertainty import CONFIDENCE, N_RESAMPLES, SEED

    order = {name: i for i, name in enumerate(ATTACKS)}
    stored = sorted((_read_json(p) for p in (folder / RESULTS_DIR).glob("*.json")),
                    key=lambda r: order.get(r["attack"], len(order)))
    results = [r for record in stored for r in record["results"]]
    rows, notes = recovery_rows(results, reference)
    for note in notes:
        echo(f"note: {note}")
    atomic_write_csv(folder / CSV_NAME, rows, columns(rows))
    headline = headline_rows(results, reference)
    atomic_write_csv(folder / outputs.HEADLINE_CSV, headline, HEADLINE_COLUMNS)
    attacks = [record["attack"] for record in stored]
    summary = {
        "name": settings.name, "base": settings.base, "model": settings.model, "attacks": attacks,
        "reference": reference,
        "headline": headline,
        "best_recovery": {attack: best_by_metric(rows, attack) for attack in attacks},
        "best_ablation": best_by_metric(rows, "ablate", ("layer", "k", "mode")) if "ablate" in attacks else None,
        "attack_seconds": {record["attack"]: record["seconds"] for record in stored},
        "notes": notes, "recovery_eps": RECOVERY_EPS,
        "intervals": {"confidence": CONFIDENCE, "resamples": N_RESAMPLES, "seed": SEED},
        "definitions": {
            "recovery": "(attacked - modified) / (base - modified) per metric, unattacked models on the same "
                        "evaluation data, with a percentile-bootstrap interval over the evaluation items (questions "
                        "or texts) paired across the models; NaN where the gap base - modified has an interval "
                        f"containing 0 (without per-item data: where |base - modified| < {RECOVERY_EPS:g}), and "
                        "for forget NLL and the accuracies where the gap has the wrong sign for unlearning (nothing "
                        "to recover)",
            "recovery_vs_control": "(attacked - modified) / (control_attacked - modified): the base under the same "
                                   "attack is the target; NaN on control rows",
            "headline": "per attack, metric and target: with several settings, the setting with the highest "
                        "recovery on half A of the evaluation items (a seeded split), scored on half B; with one "
                        "setting, scored on every item; max_recovery is the plain maximum over settings",
            "best_recovery": "per metric, the setting with the highest recovery: a maximum over settings on the "
                             "data it is scored on (optimistic; the headline is held out)",
            "best_ablation": "per metric, the ablation setting (layer, k, mode) with the highest recovery"},
        "metrics": list(METRICS),
    }
    atomic_write_json(folder / "summary.json", summary)
    if rows:
        recovery_bar_plot(folder / "recovery.png", headline, f"Recovery per attack: {settings.name}")
    if any(r["attack"] == "ablate" and r.get("mode") == "single" for r in rows):
        ablation_layer_plot(folder / "ablation_by_layer.png", rows, f"Single-layer ablation: {settings.name}")
