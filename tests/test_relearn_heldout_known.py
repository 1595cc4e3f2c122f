"""Known answers for ``relearn-heldout`` (A1 -> A2) on a planted-facts testbed (issue #23).

Deeb & Roger's logic, on a tiny GPT-NeoX that has memorised a 32-person testbed: retraining on A1's
facts can only bring A2's facts back if A2's information is still in the weights.

* present: the "unlearned" model is the base after 15 steps of gradient ascent on A's questions
  (A2's accuracy falls by half); what it suppressed comes back, so the recovery's interval is
  above 0;
* absent: the "unlearned" model was trained the same way on everything but A2 (it never knew A2's
  facts); retraining on A1 cannot teach them, so its recovery is at most 0 and its interval lies
  below the present case's.

Both runs are the attack as users run it (``run_heldout``, its split and its per-item file) and are
scored with the report's own estimates (``heldout_estimates``). The base and the model that never saw
A2 train 600 steps: at 300 (the first version) the base reached only 0.83 of A2 on this VM's AVX-512
float path and the base / unlearned intervals touched. Measured on the 2-core VM (2026-12-07), n = 24
questions about A2 each, under each ATEN_CPU_CAPABILITY (the float path changes the trained models):
avx512 (native) present 0.77 [0.50, 1.00] (A2 accuracy 1.00 -> 0.46 -> 0.88), absent 0.00 [-0.20, 0.17]
(0.33 -> 0.33); avx2 present 0.70 [0.37, 1.00], absent -0.13 [-0.42, 0.00]; default present
0.53 [0.17, 0.81], absent -0.13 [-0.40, 0.00]; the assertions hold under all three.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import group
from unlearn_lens import prompts
from unlearn_lens import testbed as T
from unlearn_lens.data import read_mcq, read_texts

FACTS = 32
BASE_STEPS = 600  # the memorised base and the model that never saw A2
RELEARN = {"relearn_steps": 40, "relearn_lr": 3e-3, "relearn_batch_size": 4}


def _cloze_text(item) -> str:
    return prompts.cloze_context(item.question) + prompts.cloze_continuations([item.choices[item.answer]])[0]


def _train(texts: list[str], steps: int, out, *, ascend: list[str] | None = None, start=None):
    """A tiny GPT-NeoX trained (AdamW, lr 1e-2, batches of 16) on ``texts``; or, with ``ascend``,
    ``start`` after gradient ascent on those texts at lr 1e-3."""
    import torch
    from transformers import AutoModelForCausalLM

    from unlearn_lens.relearn import nll_loss
    from unlearn_lens.testing import build_tokenizer, make_tiny_model

    if start is None:
        model, tokenizer = make_tiny_model("gpt_neox", seed=0)
    else:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(start), build_tokenizer()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 if ascend else 1e-2)
    order = np.random.default_rng(0)
    for _ in range(steps):
        if ascend:
            loss = -nll_loss(model, tokenizer, ascend, 48)
        else:
            loss = nll_loss(model, tokenizer, [texts[i] for i in order.choice(len(texts), 16, replace=False)], 48)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """The testbed, a base that knows every fact, GA on A, and a model that never saw A2."""
    root = tmp_path_factory.mktemp("heldout-known")
    data = root / "data"
    result = CliRunner().invoke(group, ["datasets", "create", "--facts", str(FACTS), "--outdir", str(data),
                                        "--seed", "3"])
    assert result.exit_code == 0, result.output
    entities = T.read_entities(data)
    a, a2 = T.group_question_ids(entities, ("A1", "A2")), T.group_question_ids(entities, ("A2",))
    questions = read_mcq(data)
    texts = [_cloze_text(q) for q in questions] + read_texts(data, "forget") + read_texts(data, "retain")
    a2_texts = {_cloze_text(q) for q in questions if q.id in a2} | set(T.group_texts(entities, ("A2",)))
    base = _train(texts, BASE_STEPS, root / "base")
    return {
        "data": data, "base": base,
        "ascended": _train([], 15, root / "ascended", ascend=[_cloze_text(q) for q in questions if q.id in a],
                           start=base),
        "never_saw_a2": _train([t for t in texts if t not in a2_texts], BASE_STEPS, root / "never-saw-a2"),
    }


def _recovery(memorised, which: str, tmp_path):
    from analyses.report.testbed import heldout_estimates
    from unlearn_lens.attacks import relearning as R
    from unlearn_lens.attacks.base import AttackContext, AttackSettings

    settings = AttackSettings(base=str(memorised["base"]), model=str(memorised[which]), name=which,
                              data=str(memorised["data"]), outdir=str(tmp_path), attacks=("relearn-heldout",),
                              max_length=48, batch_size=8, options=RELEARN)
    ctx = AttackContext(settings, echo=lambda message: None)
    R.run_heldout(ctx)
    return heldout_estimates(json.loads((ctx.attack_dir / R.PER_ITEM_FILE).read_text()))


@pytest.mark.slow
def test_relearning_on_a1_brings_back_what_gradient_ascent_suppressed_and_not_what_was_never_there(
        memorised, tmp_path):
    present = _recovery(memorised, "ascended", tmp_path / "present")
    absent = _recovery(memorised, "never_saw_a2", tmp_path / "absent")
    n = FACTS // 4 * len(T.ATTRIBUTES)
    assert present["recovery"].n == absent["recovery"].n == n
    # the base knows A2; both "unlearned" models do not
    assert present["base_before"].value >= 0.75
    assert present["modified_before"].high < present["base_before"].low
    assert absent["modified_before"].high < absent["base_before"].low
    # suppressed knowledge comes back: the interval is above 0
    assert present["recovery"].low > 0, present["recovery"]
    # knowledge never planted does not: no recovery, and the two intervals do not overlap
    assert absent["recovery"].value <= 0, absent["recovery"]
    assert absent["recovery"].high < present["recovery"].low, (absent["recovery"], present["recovery"])
