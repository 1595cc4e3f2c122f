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

from unlearn_lens.attacks.base import (ATTACKS, METRICS, NEEDS_CACHES, AttackContext, AttackSettings,
                                       attack_options, resolve_attack, timed)
from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError

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
    open_caches(urls, "forget")  # refuses caches of different tokens, in one line
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
    checks = [(settings.batch_size >= 1, f"--batch-size must be at least 1, got {settings.batch_size}"),
              (settings.max_length >= 2, f"--max-length must be at least 2, got {settings.max_length}"),
              (settings.max_samples is None or settings.max_samples >= 1,
               f"--max-samples must be at least 1, got {settings.max_samples}"),
              (bool(settings.attacks), "--attacks is empty; choose from " + ", ".join(ATTACKS)),
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
    """What the reference evaluation (and so every stored result) depends on."""
    return {k: getattr(settings, k) for k in ("base", "model", "base_revision", "model_revision", "data",
                                               "max_samples", "max_length", "dtype", "batch_size")}


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
    pending = [a for a in settings.attacks if settings.force or not _result_path(folder, a).is_file()]
    if not pending and is_complete(folder):
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
    mark_complete(folder, {"step": "attack", "attacks": list(settings.attacks)})
    return folder


def write_outputs(folder: Path, settings: AttackSettings, reference: dict, echo: Callable[[str], None]) -> None:
    """``attacks.csv``, ``summary.json``, ``recovery.png`` and ``ablation_by_layer.png`` from the stored results."""
    from analyses.attack_plots import ablation_layer_plot, recovery_bar_plot
    from analyses.io import atomic_write_csv, atomic_write_json
    from analyses.recovery import RECOVERY_EPS, best_by_metric, columns, recovery_rows

    order = {name: i for i, name in enumerate(ATTACKS)}
    stored = sorted((_read_json(p) for p in (folder / RESULTS_DIR).glob("*.json")),
                    key=lambda r: order.get(r["attack"], len(order)))
    results = [r for record in stored for r in record["results"]]
    rows, notes = recovery_rows(results, reference)
    for note in notes:
        echo(f"note: {note}")
    atomic_write_csv(folder / CSV_NAME, rows, columns(rows))
    attacks = [record["attack"] for record in stored]
    summary = {
        "name": settings.name, "base": settings.base, "model": settings.model, "attacks": attacks,
        "reference": reference,
        "best_recovery": {attack: best_by_metric(rows, attack) for attack in attacks},
        "best_ablation": best_by_metric(rows, "ablate", ("layer", "k", "mode")) if "ablate" in attacks else None,
        "attack_seconds": {record["attack"]: record["seconds"] for record in stored},
        "notes": notes, "recovery_eps": RECOVERY_EPS,
        "definitions": {
            "recovery": "(attacked - modified) / (base - modified) per metric, unattacked models on the same "
                        f"evaluation data; NaN where |base - modified| < {RECOVERY_EPS:g}",
            "recovery_vs_control": "(attacked - modified) / (control_attacked - modified): the base under the same "
                                   "attack is the target; NaN on control rows",
            "best_ablation": "per metric, the ablation setting (layer, k, mode) with the highest recovery"},
        "metrics": list(METRICS),
    }
    atomic_write_json(folder / "summary.json", summary)
    if rows:
        recovery_bar_plot(folder / "recovery.png", rows, f"Recovery per attack: {settings.name}")
    if any(r["attack"] == "ablate" and r.get("mode") == "single" for r in rows):
        ablation_layer_plot(folder / "ablation_by_layer.png", rows, f"Single-layer ablation: {settings.name}")
