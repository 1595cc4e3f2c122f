"""`unlearn-lens attack`: is the knowledge still there? Attacks that try to bring it back."""

from __future__ import annotations

from typing import Any

import click

from unlearn_lens.commands.brittleness import _common_options
from unlearn_lens.core.errors import UserError


def coerce_option(key: str, text: str, default: Any) -> Any:
    """Parse ``--option KEY=VALUE``'s value after the type of the option's default."""
    def number(part: str) -> Any:
        for kind in (int, float):
            try:
                return kind(part)
            except ValueError:
                pass
        return part

    try:
        if isinstance(default, (tuple, list)) or default is None:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            kind = type(default[0]) if default else None
            return tuple(kind(p) for p in parts) if kind is not None else tuple(number(p) for p in parts)
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return type(default)(text)
    except ValueError:
        raise UserError(f"--option {key}={text}: expected a value like {default!r}") from None


def parse_option_flags(pairs: tuple[str, ...], attacks: tuple[str, ...]) -> dict:
    """``("ablate_k=1,4", ...)`` -> ``{"ablate_k": (1, 4)}``, typed after each attack's ATTACK_OPTIONS."""
    from unlearn_lens.attacks.base import attack_options

    known = attack_options(attacks)
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--option {pair!r}: expected KEY=VALUE")
        if key not in known:
            raise UserError(f"--option {key}: not an option of {', '.join(attacks)} "
                            f"(known: {', '.join(sorted(known)) or 'none'})")
        options[key] = coerce_option(key, value, known[key])
    return options


@click.command("attack")
@_common_options
@click.option("--base", "--base-model", "base_spec", required=True,
              help="The base model the modified --model came from: the recovery target and the control.")
@click.option("--base-revision", default=None, help="Hub revision of --base.")
@click.option("--attacks", "attacks_text", default="ablate,quantize,relearn-unrelated,relearn-heldout",
              show_default=True, help="Comma-separated attacks to run.")
@click.option("--cache-base", default=None,
              help="Activation cache of --base (`unlearn-lens capture`; needed by ablate; default "
                   "OUT/caches/base.zarr, where the pipeline puts it).")
@click.option("--cache-model", default=None,
              help="Activation cache of --model (needed by ablate; default OUT/caches/<name>.zarr).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Texts or prompts per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the attacks' random choices.")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="An attack setting, repeatable, e.g. ablate_k=1,4 ablate_layers=3,7 "
                   "ablate_modes=single,orthogonalize (each attack module lists its options and defaults).")
def attack(model_spec, revision, data_dir, outdir, name, max_samples, max_length, device, dtype, trust_remote_code,
           overwrite, base_spec, base_revision, attacks_text, cache_base, cache_model, batch_size, seed,
           option_pairs) -> None:
    """Is the knowledge still there? Attack the modified --model (and the --base as control), then evaluate.

    Writes OUT/<name>/attacks/attacks.csv: one row per attack, setting and target (modified /
    control) with letter and cloze accuracy, forget and retain NLL, and per metric the recovery
    (attacked - modified) / (base - modified) and the recovery against the attacked control;
    plus reference.json, summary.json (best ablation layer and k), recovery.png and
    ablation_by_layer.png. Finished attacks are skipped unless --overwrite.
    """
    from unlearn_lens.attacks.base import AttackSettings
    from unlearn_lens.attacks.runner import run_attacks
    from unlearn_lens.core.outputs import default_name

    attacks = tuple(a.strip() for a in attacks_text.split(",") if a.strip())
    settings = AttackSettings(
        base=base_spec, model=model_spec, name=name or default_name(model_spec), data=data_dir, outdir=outdir,
        attacks=attacks, cache_base=cache_base, cache_model=cache_model, base_revision=base_revision,
        model_revision=revision, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
        max_samples=max_samples, seed=seed, force=overwrite, trust_remote_code=trust_remote_code,
        options=parse_option_flags(option_pairs, attacks))
    folder = run_attacks(settings, echo=lambda message: click.echo(message, err=True))
    click.echo(f"attack results in {folder}")
