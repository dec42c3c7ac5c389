"""Was this benchmark item in the training data? Asked of the corpus a data run actually produced.

The data stage saves the n-gram hashes of every document it kept (`ngram_index/`, outputs of its
manifest); an item is contaminated when at least `threshold` of its own n-grams appear there.
Unlike a perplexity heuristic this names the data run responsible, and through the lineage
manifests the training runs that read it. Items shorter than n tokens have no n-grams and can
never be flagged; their overlap is reported as 0.

When the training data is not at hand (someone else's model), the order test asks the model
itself, in the spirit of Oren et al. (2023, "Proving test set contamination in black box language
models"): a model that never saw an item has no reason to prefer its published option order over
a reordering, so the published order is the likeliest of 1 + k orderings for about 1 / (1 + k) of
the items. A model that memorized the benchmark prefers it far more often; the report gives that
rate and the one-sided binomial p-value of seeing it by chance.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from internray.eval.benchmarks import BenchmarkSpec
from internray.ngrams import corpus_overlap, record_text
from internray.runs import read_manifest


def item_text(item: dict) -> str:
    """The item as the data stage's decontamination reads a benchmark record; our `id` excluded."""
    return record_text({k: v for k, v in item.items() if k != "id"})


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


def order_variants(spec: BenchmarkSpec, item: dict, permutations: int, seed: int) -> list[str]:
    """The item's question as published, then `permutations` distinct reorderings of its options
    (fewer if it has too few options), seeded per item so reruns score the same texts."""
    options = [item[f] for f in spec.choice_fields]
    orders = [tuple(range(len(options)))]
    rng = random.Random(f"{seed}/{item['id']}")
    wanted = min(permutations, math.factorial(len(options)) - 1)
    while len(orders) < 1 + wanted:
        order = tuple(rng.sample(range(len(options)), len(options)))
        if order not in orders:
            orders.append(order)
    texts = []
    for order in orders:
        fields = dict(item) | {f: options[i] for f, i in zip(spec.choice_fields, order, strict=True)}
        texts.append(spec.template.format(**fields))
    return texts


def order_test(loglikelihoods: list[list[float]]) -> dict:
    """Per item, the published order's loglikelihood first, then the reorderings'."""
    n = len(loglikelihoods)
    hits = sum(lls[0] > max(lls[1:]) for lls in loglikelihoods if len(lls) > 1)
    chance = sum(1 / len(lls) for lls in loglikelihoods if len(lls) > 1) / max(n, 1)
    p_value = sum(math.comb(n, k) * chance**k * (1 - chance) ** (n - k) for k in range(hits, n + 1)) if n else 1.0
    return {"method": "option-order test (published order likeliest)", "items": n,
            "rate": hits / max(n, 1), "chance_rate": chance, "p_value": min(p_value, 1.0)}
