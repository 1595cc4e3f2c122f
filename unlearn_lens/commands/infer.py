"""`unlearn-lens infer`: generate from one model, two side by side, interactively, or a sweep."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.core.settings import DEFAULT_OUTDIR


def _name_of(spec: str) -> str:
    """A model's label: the one naming rule of every command (``unlearn_lens.core.outputs.default_name``)."""
    from unlearn_lens.core.outputs import default_name

    return default_name(spec)


@click.command("infer")
@options.model(required=False)
@click.option("--model-b", default=None, help="A second model, answered side by side with --model.")
@click.option("--prompt", default=None, help="The prompt (plain text; see --chat-template).")
@click.option("--interactive", is_flag=True, help="Read prompts from the terminal until an empty line or EOF.")
@click.option("--sweep", is_flag=True, help="Run the prompt through every --models entry and write a CSV.")
@click.option("--models", "sweep_models", multiple=True, help="A model for --sweep (repeat the flag).")
@click.option("--include-base", is_flag=True,
              help="With --sweep: add the three deep-ignorance models (unfiltered, e2e-strong-filter, cb-lat).")
@options.revision(of="every model")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="Nucleus sampling threshold.")
@click.option("--greedy", is_flag=True, help="Greedy decoding (ignores --temperature and --top-p).")
@click.option("--chat-template", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@options.seed(help="Sampling seed.")
@options.outdir(default=DEFAULT_OUTDIR,
                help="Root for sweep CSVs: OUTDIR/inference/<sha256 of the prompt>.csv.")
@options.device()
@options.dtype(choices=None, help="auto, float32, float16 or bfloat16.")
@options.trust_remote_code()
def infer(model_spec, model_b, prompt, interactive, sweep, sweep_models, include_base, revision,
          max_new_tokens, temperature, top_p, greedy, chat_template, seed, outdir, device, dtype,
          trust_remote_code) -> None:
    """Generate text: one prompt, side by side (--model-b), --interactive, or a --sweep to CSV."""
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.core.limits import check_at_least
    from unlearn_lens.inference import (DEEP_IGNORANCE_MODELS, GenerationSettings, generate,
                                        prompt_csv_path, write_sweep_csv)
    from unlearn_lens.loading import load_model

    check_at_least("--max-new-tokens", max_new_tokens, 1)
    if not greedy and (temperature <= 0 or not 0 < top_p <= 1):
        raise UserError("--temperature must be > 0 and --top-p in (0, 1] (or use --greedy)")
    settings = GenerationSettings(max_new_tokens, temperature, top_p, greedy, seed, chat_template)

    def load(spec):
        return load_model(spec, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    if sweep:
        if not prompt:
            raise UserError("--sweep needs --prompt")
        specs = {_name_of(s): s for s in sweep_models}
        if include_base:
            specs = {**{name: spec for name, spec in DEEP_IGNORANCE_MODELS.items()}, **specs}
        if not specs:
            raise UserError("--sweep needs --models (repeatable) or --include-base")
        rows = []
        for name, spec in specs.items():
            lm, tokenizer = load(spec)
            output = generate(lm, tokenizer, prompt, settings)
            click.echo(f"=== {name} ===\n{output}\n")
            rows.append({"prompt": prompt, "model": name, "model_path": spec, "output": output})
            del lm
        path = write_sweep_csv(prompt_csv_path(outdir, prompt), rows)
        click.echo(f"wrote {path}")
        return
    if not model_spec:
        raise UserError("give --model (or --sweep with --models)")
    if not prompt and not interactive:
        raise UserError("give --prompt or --interactive")
    models = [(_name_of(model_spec), *load(model_spec))]
    if model_b:
        models.append((_name_of(model_b), *load(model_b)))

    def answer(text: str) -> None:
        for name, lm, tokenizer in models:
            header = f"=== {name} ===\n" if len(models) > 1 else ""
            click.echo(f"{header}{generate(lm, tokenizer, text, settings)}\n")

    if prompt:
        answer(prompt)
    if interactive:
        while True:
            try:
                text = input("prompt> ")
            except EOFError:
                break
            if not text.strip() or text.strip() in {"exit", "quit"}:
                break
            answer(text)
