"""Was this benchmark item in the training data? Asked of the corpus a data run actually produced.

The data stage saves the n-gram hashes of every document it kept (`ngram_index/`, outputs of its
manifest); an item is contaminated when at least `threshold` of its own n-grams appear there.
Unlike a perplexity heuristic this names the data run responsible, and through the lineage
manifests the training runs that read it. Items shorter than n tokens have no n-grams and can
never be flagged; their overlap is reported as 0.
"""
from __future__ import annotations

from pathlib import Path

from internray.ngrams import corpus_overlap
from internray.runs import read_manifest


def item_text(item: dict) -> str:
    """Every string of the item, in order (question, choices, answer...), as the data stage's
    decontamination reads benchmark records; our own `id` field excluded."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
    return " ".join(strings({k: v for k, v in item.items() if k != "id"}))


def corpus_index(data_run: str | Path) -> Path:
    outputs = read_manifest(data_run).get("outputs", {})
    if "ngram_index" not in outputs:
        raise ValueError(f"{data_run} saved no corpus n-gram index: rerun its data stage with "
                         "decontaminate.save_corpus_index=true")
    return Path(outputs["ngram_index"])


def contamination_flags(data_run: str | Path, items: list[dict], threshold: float) -> list[tuple[float, bool]]:
    """(overlap fraction, contaminated) per item."""
    overlaps = corpus_overlap(corpus_index(data_run), [item_text(item) for item in items])
    return [(round(o, 4), o >= threshold) for o in overlaps]
