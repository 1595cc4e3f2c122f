"""`unlearn-lens cache info|verify`: inspect and check activation caches (torch-free)."""

from __future__ import annotations

import json

import click

from unlearn_lens.core.errors import UserError


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@click.group("cache")
def cache() -> None:
    """Inspect and check activation caches (no model needed)."""


@cache.command("info")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of text.")
def info(url: str, as_json: bool) -> None:
    """Print a cache's provenance, variables and shapes, size on disk and compression ratio."""
    from cache_store.inspect import describe

    report = describe(url)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"cache {url}")
    for key, value in report["provenance"].items():
        click.echo(f"  {key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")
    for split, entry in report["splits"].items():
        state = "complete" if entry["complete"] else f"INCOMPLETE ({entry['blocks_done']} blocks)"
        click.echo(f"split {split}: {state}; {entry['samples']} samples, {entry['tokens_real']} tokens "
                   f"({entry['tokens_stored']} stored slots); {_size(entry['bytes_stored'])} on disk, "
                   f"{_size(entry['bytes_uncompressed_real'])} of real data uncompressed, ratio {entry['compression_ratio']:.2f}")
        if entry.get("selection"):
            kept = entry["selection"]
            tokens = f"{kept['token_sample']} per text (seed {kept['token_sample_seed']})" if kept["token_sample"] else "all"
            click.echo(f"  kept: resid layers {kept['resid_layers']}, mlp_in layers {kept['mlp_layers']}, arrays "
                       f"{', '.join(kept['variables'])}, tokens {tokens}")
        for name, per in entry["bytes_per_real_token_per_layer"].items():
            click.echo(f"  {name}: {per:.0f} bytes on disk per real token per layer")
        for name, var in entry["variables"].items():
            dims = ", ".join(f"{d}={s}" for d, s in zip(var["dims"], var["shape"]))
            click.echo(f"  {name:22s} ({dims}) {var['dtype']}  {_size(var['bytes_stored'])}")


@cache.command("verify")
@click.argument("url")
@click.option("--quiet", is_flag=True, help="Print only problems, no progress bar.")
@click.option("--reset-damaged", is_flag=True,
              help="Mark the blocks holding damaged or missing chunks as not written, so that rerunning the same "
                   "`unlearn-lens capture` command rewrites exactly them.")
def verify(url: str, quiet: bool, reset_damaged: bool) -> None:
    """Check completeness and integrity: every chunk present with its checksum, readable, offsets consistent,
    values finite."""
    from tqdm.auto import tqdm

    from cache_store import store
    from cache_store.inspect import verify as run_verify

    store.open_root(url, consolidated=None)  # a missing cache is a one-line error before any progress bar
    if reset_damaged:
        store.refuse_read_only(url)
    bar = tqdm(desc="verify", unit="chunk", disable=quiet)
    notes: list[str] = []
    damaged: list[str] = []
    problems = run_verify(url, progress=lambda: bar.update(1), notes=notes, damaged=damaged)
    bar.close()
    for note in notes:
        click.echo(f"note: {note}")
    for problem in problems:
        click.echo(f"FAIL {problem}")
    if damaged and reset_damaged:
        from cache_store.integrity import reset_damaged as reset

        for split, entry in reset(url, damaged).items():
            what = [f"blocks {', '.join(map(str, entry['blocks']))}"] if entry["blocks"] else []
            what += ["static arrays"] if entry["static"] else []
            click.echo(f"reset {split}: {' and '.join(what)} marked not written; rerun the same "
                       "`unlearn-lens capture` command to rewrite them")
    if problems:
        raise UserError(f"{url}: verification failed ({len(problems)} problem(s))")
    checked = "every chunk present with its checksum, " if not notes else ""
    click.echo(f"{url}: OK (complete, {checked}every chunk readable, offsets consistent, values finite)")
