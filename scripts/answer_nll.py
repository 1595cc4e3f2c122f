"""On a planted-facts testbed: NLL of A's and B's fact texts, answer (value) tokens apart from the rest.

    python scripts/answer_nll.py DATA MODEL [MODEL ...]   # the first MODEL is the reference (the planted base)

A testbed's forget NLL (``forget_nll``: every token of A's training texts) is mostly names and
templates: about 3 of some 40 tokens per text are a value. `plant` reads its loss on the values only
(``--loss-on answer``), which leaves the other tokens' NLL far above the unplanted model's, and any
fine-tuning on texts of the same templates (retain terms, relearning) brings them back down without
touching the facts. This prints, per model, the mean NLL per token of the answer tokens and of the
others, for A (forgotten) and B (kept), and for each later model the change from the first, paired over
texts, with its 95 % bootstrap interval (``analyses.uncertainty.change_estimate``) and n.
"""

from __future__ import annotations

import argparse


def split_records(model, tokenizer, facts) -> dict[str, dict[str, list[float]]]:
    """``{"answer": record, "other": record}``: per text, the NLL summed over those tokens and their count
    (the EOS left out), the record ``analyses.uncertainty`` reads."""
    import torch

    from unlearn_lens.plant import encode_facts

    out = {part: {"sum": [], "count": []} for part in ("answer", "other")}
    for ids, answer in encode_facts(tokenizer, facts, "answer"):
        tokens = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).logits[0, :-1].float(), dim=-1)
        nll = -logp.gather(1, tokens[0, 1:, None])[:, 0]
        read = torch.tensor(answer[1:-1])  # targets 1 .. n-2: the EOS is no fact
        for part, mask in (("answer", read), ("other", ~read)):
            out[part]["sum"].append(float(nll[:-1][mask].sum()))
            out[part]["count"].append(int(mask.sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a testbed data directory (`unlearn-lens datasets create --facts N`)")
    parser.add_argument("models", nargs="+", help="HF model directories; the first is the reference")
    args = parser.parse_args()

    from analyses.uncertainty import change_estimate, point_value
    from unlearn_lens.loading import load_model
    from unlearn_lens.testbed import group_facts, read_entities

    entities = read_entities(args.data)
    groups = {"A": group_facts(entities, ("A1", "A2")), "B": group_facts(entities, ("B",))}
    reference = None
    for path in args.models:
        model, tokenizer = load_model(path, dtype="float32")
        records = {group: split_records(model.eval(), tokenizer, facts) for group, facts in groups.items()}
        cells = []
        for group, parts in records.items():
            for part, record in parts.items():
                cell = f"{group} {part} {point_value(record):.3f}"
                if reference is not None:
                    cell += f" (change {change_estimate(reference[group][part], record).text(3)})"
                cells.append(cell)
        print(f"{path}: " + "; ".join(cells), flush=True)
        reference = reference or records


if __name__ == "__main__":
    main()
