"""Attack options (each attack module's ``ATTACK_OPTIONS``) given as text or values, typed after their defaults.

``unlearn-lens attack --option KEY=VALUE`` and the pipeline's per-run options (the demo's short
settings) both go through here, so a value means the same whichever way it is given.
"""

from __future__ import annotations

from typing import Any

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


def _as_text(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def typed_options(options: dict[str, Any], attacks: tuple[str, ...]) -> dict:
    """``{"ablate_k": (1,), "relearn_lr": 1e-4}`` checked and typed exactly as the same ``--option`` flags."""
    return parse_option_flags(tuple(f"{key}={_as_text(value)}" for key, value in options.items()), attacks)
