"""n-gram decontamination against benchmarks, and the corpus n-gram index eval queries later.

Text is reduced to lowercase alphanumeric tokens (each CJK character is a token), and every run
of `n` tokens is hashed to 64 bits. A document is contaminated when it shares at least
`min_matches` n-grams with any benchmark item (13-grams by default, as in GPT-3 and lm-eval).
Benchmark items shorter than `n` tokens cannot be matched; they are counted in the manifest.

The kept corpus' own n-gram hashes are saved too (`ngram_index/`), so that a later eval run can
ask "was this benchmark item in the training data?" of exactly the data this run produced
(`internray.ngrams.corpus_overlap`, shared with the eval stage so both hash n-grams the same way).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from internray.ngrams import ngram_hashes, record_text


def benchmark_items(path: Path) -> Iterator[str]:
    """One text per JSONL record: all its string values, in order (questions, choices, answers)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield record_text(json.loads(line))


def build_benchmark_index(benchmarks: list[Path], n: int, out: Path) -> dict[str, int]:
    """Write (hash, benchmark, item) for every benchmark n-gram; return item counts."""
    hashes, names, items, counts = [], [], [], {"benchmark_items": 0, "benchmark_items_too_short": 0}
    for path in benchmarks:
        for index, text in enumerate(benchmark_items(Path(path))):
            h = ngram_hashes(text, n)
            counts["benchmark_items"] += 1
            counts["benchmark_items_too_short"] += int(len(h) == 0)
            hashes.append(h)
            names.extend([Path(path).name] * len(h))
            items.extend([index] * len(h))
    all_hashes = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"hash": all_hashes, "benchmark": names, "item": np.array(items, dtype=np.int64)}), out)
    return counts


class MarkContaminated:
    """Ray Data UDF: drop or flag documents sharing n-grams with the benchmark index."""

    def __init__(self, index_path: str, n: int, min_matches: int, action: str):
        table = pq.read_table(index_path)
        order = np.argsort(table.column("hash").to_numpy())
        self.hashes = table.column("hash").to_numpy()[order]
        self.benchmarks = np.array(table.column("benchmark").to_pylist(), dtype=object)[order]
        self.n, self.min_matches, self.action = n, min_matches, action

    def __call__(self, batch: pa.Table) -> pa.Table:
        drops, metas = batch.column("drop").to_pylist(), batch.column("meta").to_pylist()
        for row, text in enumerate(batch.column("text").to_pylist()):
            if drops[row] is not None or len(self.hashes) == 0:
                continue
            doc = ngram_hashes(text, self.n)
            pos = np.searchsorted(self.hashes, doc).clip(max=len(self.hashes) - 1)
            hit = self.hashes[pos] == doc
            if hit.sum() < self.min_matches:
                continue
            if self.action == "drop":
                drops[row] = "contaminated"
            meta = json.loads(metas[row])
            meta["contamination"] = {"matches": int(hit.sum()), "benchmarks": sorted(set(self.benchmarks[pos[hit]]))}
            metas[row] = json.dumps(meta, ensure_ascii=False)
        batch = batch.set_column(batch.schema.get_field_index("drop"), "drop", pa.array(drops, pa.string()))
        return batch.set_column(batch.schema.get_field_index("meta"), "meta", pa.array(metas, pa.string()))


def corpus_ngram_rows(batch: pa.Table, n: int) -> pa.Table:
    """Ray Data UDF: the unique n-gram hashes of a batch of kept documents."""
    per_doc = [ngram_hashes(t, n) for t in batch.column("text").to_pylist()]
    hashes = np.unique(np.concatenate(per_doc)) if per_doc else np.empty(0, dtype=np.uint64)
    return pa.table({"hash": hashes})
