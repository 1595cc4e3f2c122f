"""`unlearn-lens attack`: is the knowledge still there? Attacks that try to bring it back."""

from __future__ import annotations

import click

from unlearn_lens import options
from unlearn_lens.attacks.base import AttackSettings
from unlearn_lens.attacks.options import parse_option_flags


@click.command("attack")
@options.model_side(model_help="The modified model to attack: hub id, local HF directory or .gguf file.")
@click.option("--base", "--base-model", "base_spec", required=True,
              help="The base model the modified --model came from: the recovery target and the control.")
@options.revision(name="--base-revision", of="--base")
@options.data()
@options.outdir()
@options.name()
@options.max_samples(help=options.MEASURED_SAMPLES_HELP)
@options.max_length()
@options.compute()
@click.option("--attacks", "attacks_text", default=",".join(AttackSettings.attacks),
              show_default=True, help="Comma-separated attacks to run.")
@click.option("--cache-base", default=None,
              help="Activation cache of --base (`unlearn-lens capture`; needed by ablate; default "
                   "OUT/caches/base.zarr, where the pipeline puts it).")
@click.option("--cache-model", default=None,
              help="Activation cache of --model (needed by ablate; default OUT/caches/<name>.zarr).")
@options.seed(help="Seed of the attacks' random choices.")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="An attack setting, repeatable, e.g. ablate_k=1,4 ablate_layers=3,7 "
                   "ablate_modes=single,per_layer,orthogonalize quant_settings=int8,int4,int4-g32 "
                   "quant_bitsandbytes=bnb-fp4 relearn_preset=reference (each attack module lists its options "
                   "and defaults; README 'Is the knowledge still there?' gives each reference and the measured "
                   "size of each deviation from it: ablation fits skip position 0 and outlier tokens as Lucki "
                   "et al., int4 is torchao's symmetric config at Int4WeightOnlyConfig's group 128, "
                   "relearn_preset=reference is Lucki et al.'s LoRA fine-tuning without its chat template).")
@options.overwrite(help="Redo attacks that are already finished.")
def attack(model_spec, revision, trust_remote_code, base_spec, base_revision, data_dir, outdir, name, max_samples,
           max_length, device, dtype, batch_size, attacks_text, cache_base, cache_model, seed, option_pairs,
           overwrite) -> None:
    """Is the knowledge still there? Attack the modified --model (and the --base as control), then evaluate.

    Writes OUT/<name>/attacks/attacks.csv: one row per attack, setting and target (modified /
    control) with letter and cloze accuracy, forget and retain NLL, and per metric the recovery
    (attacked - modified) / (base - modified) and the recovery against the attacked control;
    plus reference.json, summary.json (best ablation layer and k), recovery.png and
    ablation_by_layer.png. Finished attacks are skipped unless --overwrite.
    """
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
