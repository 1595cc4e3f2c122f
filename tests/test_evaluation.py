"""evaluate(): NLL, letter and cloze accuracy against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn_lens import prompts
from unlearn_lens.data import MCQItem
from unlearn_lens.evaluation import (cloze_accuracy, cloze_scores, evaluate, letter_accuracy, letter_scores,
                                     mean_token_nll)
from unlearn_lens.testing import make_tiny_model

ITEMS = [
    MCQItem("q0", "Which organelle produces most of the cell's energy?", ("Nucleus", "Mitochondrion", "Ribosome", "Golgi"), 1),
    MCQItem("q1", "How do bacteria divide?", ("Mitosis", "Meiosis", "Binary fission", "Budding"), 2),
    MCQItem("q2", "What protects a virus genome?", ("Capsid", "Wall", "Membrane", "Nucleus"), 0),
]


@pytest.fixture(scope="module", params=["gpt_neox", "llama", "gpt2"])
def tiny(request):
    return make_tiny_model(request.param)


def test_nll_equals_hf_loss_per_text(tiny):
    model, tokenizer = tiny
    texts = ["The river flows through the valley.", "Paris is the capital of France and a centre of art."]
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    # tolerance: F32-ORDER (batched, padded NLL vs one text at a time; rel 1e-5 of an O(1) mean)
    assert mean_token_nll(model, tokenizer, texts, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_letter_scores_equal_manual_last_token_logits(tiny):
    model, tokenizer = tiny
    letter_ids = prompts.letter_token_ids(tokenizer)
    manual = []
    for item in ITEMS:
        ids = tokenizer(prompts.letter_prompt(item.question, item.choices), add_special_tokens=False,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():
            manual.append(model(input_ids=ids).logits[0, -1, letter_ids])
    manual = torch.stack(manual)
    batched = letter_scores(model, tokenizer, ITEMS, batch_size=2)  # padding inside a batch
    # tolerance: F32-ORDER
    torch.testing.assert_close(batched, manual, atol=1e-4, rtol=1e-4)
    expected = (manual.argmax(-1) == torch.tensor([i.answer for i in ITEMS])).sum().item() / len(ITEMS)
    assert letter_accuracy(model, tokenizer, ITEMS, batch_size=2) == expected


def test_cloze_scores_equal_manual_mean_logprob(tiny):
    model, tokenizer = tiny
    item = ITEMS[0]
    context = tokenizer(prompts.cloze_context(item.question), add_special_tokens=False)["input_ids"]
    manual = []
    for continuation in prompts.cloze_continuations(item.choices):
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        manual.append(sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(cont)) / len(cont))
    # tolerance: F32-ORDER (a mean of float32 log-probs)
    assert cloze_scores(model, tokenizer, [item], batch_size=3)[0] == pytest.approx(manual, abs=1e-4)


class _FixedLM(torch.nn.Module):
    """A hand-built 'model': log-probs depend only on the current token (bigram table)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.training = False

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_cloze_accuracy_hand_built_case():
    from unlearn_lens.testing import build_tokenizer

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    item = MCQItem("h", "How do bacteria divide?", ("Mitosis", "Binary fission", "Meiosis", "Budding"), 1)
    favourite = tokenizer(" Binary fission", add_special_tokens=False)["input_ids"]
    table = torch.zeros(vocab, vocab)
    table[:, favourite] = 10.0  # every position strongly predicts the tokens of choice B
    model = _FixedLM(table)
    assert cloze_accuracy(model, tokenizer, [item]) == 1.0
    wrong = MCQItem("h", item.question, item.choices, 0)
    assert cloze_accuracy(model, tokenizer, [wrong]) == 0.0


def test_evaluate_from_data_dir(unlearn_data_dir):
    model, tokenizer = make_tiny_model("gpt_neox")
    result = evaluate(model, tokenizer, unlearn_data_dir, max_length=64, batch_size=4)
    assert set(result) >= {"forget_nll", "retain_nll", "retain_ppl", "letter_accuracy", "cloze_accuracy"}
    assert result["retain_ppl"] == pytest.approx(math.exp(result["retain_nll"]))
    assert 0.0 <= result["letter_accuracy"] <= 1.0 and result["n_questions"] == 4
    # a random-init model of vocabulary V has NLL near log V
    assert abs(result["forget_nll"] - math.log(len(tokenizer))) < 1.0
    # no testbed, no planted values: the values' NLL is not measured, and no per-item record claims it was
    assert math.isnan(result["forget_value_nll"]) and "forget_value_nll" not in result["per_item"]


def test_per_item_results_reproduce_every_metric_and_each_texts_own_nll(tiny):
    """evaluate()'s per-item values (what the intervals resample) give back its metrics, and each text's
    summed NLL is that text's own HF loss times its predicted tokens."""
    from analyses.uncertainty import PER_ITEM, metric_estimate

    model, tokenizer = tiny
    forget = ["The river flows through the valley.", "x", "Paris is the capital of France and a centre of art."]
    retain = ["A short retain text.", "Another retain text about the sea and the sky."]
    result = evaluate(model, tokenizer, forget_texts=forget, retain_texts=retain, mcq_items=ITEMS, batch_size=2)
    per_item = result[PER_ITEM]
    for metric in ("forget_nll", "retain_nll", "letter_accuracy", "cloze_accuracy"):
        assert metric_estimate(per_item[metric]).value == pytest.approx(result[metric], rel=1e-6)
    assert len(per_item["cloze_accuracy"]["correct"]) == len(ITEMS)
    assert per_item["forget_nll"]["count"][1] == max(0, len(tokenizer("x")["input_ids"]) - 1)
    for text, total, count in zip(forget, per_item["forget_nll"]["sum"], per_item["forget_nll"]["count"]):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            assert (total, count) == (0.0, 0)
            continue
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        assert count == ids.shape[1] - 1
        # tolerance: F32-ORDER (a padded batch against the text alone)
        assert total == pytest.approx(loss * count, rel=1e-5)
