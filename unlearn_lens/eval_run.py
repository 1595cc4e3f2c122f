"""`unlearn-lens eval`'s work: one model's own evaluation, on the texts the relearning attack measures.

``run_eval`` writes a model's zero-shot WMDP accuracy (letter and cloze scoring, the lenses'
prompts), forget NLL and retain perplexity over the measurement half of forget.txt / retain.txt
(``unlearn_lens.relearn.split_measure_pool``), so its numbers are the relearning curve's step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn_lens.core import outputs
from unlearn_lens.core.identity import inputs_record
from unlearn_lens.core.limits import check_counts
from unlearn_lens.core.outputs import check_model_name, default_name
from unlearn_lens.core.settings import DEFAULT_MAX_LENGTH, Compute, ModelRef
from unlearn_lens.relearn import EVAL_METRICS, evaluate_data, load_eval_data, load_for_eval, settings_record


@dataclass(frozen=True)
class EvalSettings:
    """Everything ``run_eval`` needs (the `eval` command's flags)."""

    model: ModelRef
    data: str
    outdir: str
    name: str | None = None  # default: derived from model.spec
    compute: Compute = Compute()
    max_samples: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    overwrite: bool = False


def run_eval(settings: EvalSettings) -> Path:
    """Write ``OUT/<name>/evaluation/`` (eval_results.csv, summary.json, marker last); returns it.

    ``eval_results.csv`` has one row per metric (columns ``metric,value``). A finished folder is
    left alone unless ``overwrite``.
    """
    from analyses.io import atomic_write_csv, atomic_write_json, clear_complete, is_complete, mark_complete
    from unlearn_lens.data import warn_if_contaminated

    s = settings
    model_spec, revision, trust_remote_code = s.model.spec, s.model.revision, s.model.trust_remote_code
    data_dir, outdir, name, max_samples, max_length = s.data, s.outdir, s.name, s.max_samples, s.max_length
    device, dtype, batch_size, overwrite = s.compute.device, s.compute.dtype, s.compute.batch_size, s.overwrite
    name = check_model_name(name or default_name(model_spec))
    check_counts(max_samples=max_samples, batch_size=batch_size, max_length=max_length)
    folder = outputs.model_dir(outdir, name) / outputs.EVALUATION
    inputs = inputs_record(models=[("model", model_spec, revision)], data=data_dir, settings=settings)
    if is_complete(folder, inputs) and not overwrite:
        return folder
    data = load_eval_data(data_dir, max_samples, retain_questions=True)
    contaminated = warn_if_contaminated(data.all_forget, data.items)
    model, tokenizer = load_for_eval(model_spec, revision, dtype, device, trust_remote_code)
    metrics = evaluate_data(model, tokenizer, data, max_length, batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    clear_complete(folder)
    atomic_write_csv(folder / outputs.EVAL_CSV, [{"metric": m, "value": metrics[m]} for m in EVAL_METRICS],
                     ["metric", "value"])
    atomic_write_json(folder / "summary.json", {
        "name": name, "model": model_spec, "revision": revision, "metrics": {m: metrics[m] for m in EVAL_METRICS},
        "questions_in_forget_text": contaminated,
        "settings": settings_record(max_samples=max_samples, max_length=max_length, batch_size=batch_size,
                                     dtype=dtype, device=device),
        "definitions": {
            "forget_nll": "mean next-token NLL per token over the measurement half of forget.txt "
                          "(fixed content-hash split; the other half is the relearning attack pool)",
            "forget_value_nll": "on a planted-facts testbed, the same over the tokens of the facts' values alone "
                                "(those overlapping a value's characters); NaN on other data",
            "retain_nll": "the same over the measurement half of retain.txt; retain_ppl = exp(retain_nll)",
            "letter_accuracy": "lm-eval wmdp_bio zero-shot: argmax of the ' A'..' D' logits after 'Answer:'",
            "cloze_accuracy": "argmax over choices of the mean log-probability of the choice's tokens",
            "retain_cloze_accuracy": "cloze accuracy on the retain-set questions (retain_mcq.jsonl; NaN without it)"}})
    mark_complete(folder, {"step": "eval"}, inputs)
    return folder
