"""Word n-gram hashes: how the data stage indexes a corpus and how eval asks that index questions.

Text is reduced to lowercase alphanumeric tokens (each CJK character is a token), and every run
of `n` tokens is hashed to 64 bits. Both stages import this one module, so a benchmark item's
n-grams are hashed exactly as the corpus' were when the data run saved its `ngram_index/`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

_TOKENS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def record_text(record: Any) -> str:
    """All the strings of a benchmark record, in order (question, choices, answer): the text its
    n-grams are taken from, by the data stage's decontamination and eval's contamination check alike."""
    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
    return " ".join(strings(record))


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Unique uint64 hashes of the text's token n-grams (empty if shorter than n tokens)."""
    tokens = _TOKENS.findall(text.lower())
    if len(tokens) < n:
        return np.empty(0, dtype=np.uint64)
    grams = np.array([" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)], dtype=object)
    return np.unique(pd.util.hash_array(grams, categorize=False).astype(np.uint64))


def corpus_overlap(index_dir: str | Path, texts: list[str]) -> list[float]:
    """For each text, the fraction of its n-grams present in a data run's corpus index."""
    meta = json.loads((Path(index_dir) / "meta.json").read_text())
    per_text = [ngram_hashes(t, meta["ngram"]) for t in texts]
    wanted = np.unique(np.concatenate(per_text)) if per_text else np.empty(0, dtype=np.uint64)
    found = np.zeros(len(wanted), dtype=bool)
    for shard in sorted(Path(index_dir).glob("*.parquet")):
        found |= np.isin(wanted, pq.read_table(shard).column("hash").to_numpy())
    present = set(wanted[found].tolist())
    return [float(np.mean([h in present for h in hs.tolist()])) if len(hs) else 0.0 for hs in per_text]
