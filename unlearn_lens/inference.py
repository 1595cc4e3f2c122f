"""Text generation for quick looks at what a model says: one prompt, side by side, or a sweep."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from unlearn_lens.core.atomic import atomic_write_text

DEEP_IGNORANCE_MODELS = {
    "unfiltered": "EleutherAI/deep-ignorance-unfiltered",
    "filtered": "EleutherAI/deep-ignorance-e2e-strong-filter",
    "unlearned": "EleutherAI/deep-ignorance-unfiltered-cb-lat",
}
CSV_COLUMNS = ("prompt", "model", "model_path", "output")


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; ``greedy`` overrides temperature and top-p."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False
    seed: int = 0
    chat_template: bool = False


def generate(model, tokenizer, prompt: str, settings: GenerationSettings) -> str:
    """The model's continuation of ``prompt`` (new text only, special tokens stripped)."""
    import torch

    if settings.chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    torch.manual_seed(settings.seed)
    sampling = {"do_sample": False} if settings.greedy else {
        "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def prompt_csv_path(outdir: str | Path, prompt: str) -> Path:
    """``<outdir>/inference/<sha256 of the prompt>.csv``: the same prompt always maps to one file."""
    return Path(outdir) / "inference" / f"{hashlib.sha256(prompt.encode('utf-8')).hexdigest()}.csv"


def write_sweep_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write the sweep's rows atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
