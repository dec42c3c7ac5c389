"""Search a corpus the data stage produced, with BM25, so an agent can look things up offline.

The corpus is what `internray.corpus.load_documents` reads: a data-stage run (its `documents`
output: the cleaned, deduplicated text), or any Parquet file/directory or JSONL with `text`. The index is built once per tool worker
and kept in memory: fine for the millions of documents one machine holds, not for a web-scale
corpus (serve that from a search engine behind the HTTP API tool). Words are lowercased ASCII
runs; CJK text, which has no spaces, is indexed by character bigrams.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from internray.agent.tools.base import Tool, ToolContext, ToolError
from internray.corpus import load_documents

_WORD = re.compile(r"[a-z0-9]+|[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def terms(text: str) -> list[str]:
    out = []
    for run in _WORD.findall(text.lower()):
        if _CJK.match(run):
            out.extend(run[i:i + 2] for i in range(max(1, len(run) - 1)))
        else:
            out.append(run)
    return out


class BM25Index:
    """Okapi BM25 (k1=1.5, b=0.75) over term postings held as numpy arrays."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        lengths = np.zeros(len(texts), dtype=np.float32)
        for doc, text in enumerate(texts):
            counts = Counter(terms(text))
            lengths[doc] = sum(counts.values())
            for term, tf in counts.items():
                postings[term].append((doc, tf))
        self.lengths, self.mean_length = lengths, float(lengths.mean()) if len(texts) else 0.0
        self.postings = {t: (np.array([d for d, _ in p]), np.array([tf for _, tf in p], dtype=np.float32))
                         for t, p in postings.items()}

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        scores = np.zeros(len(self.lengths), dtype=np.float32)
        n = len(self.lengths)
        for term in set(terms(query)):
            if term not in self.postings:
                continue
            docs, tf = self.postings[term]
            idf = math.log(1 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            norm = self.k1 * (1 - self.b + self.b * self.lengths[docs] / self.mean_length)
            scores[docs] += idf * tf * (self.k1 + 1) / (tf + norm)
        top = np.argsort(-scores)[:k]
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]


class CorpusSearch(Tool):
    name = "search"

    def __init__(self, corpus: Path, top_k: int = 3, snippet_chars: int = 400):
        self.corpus, self.top_k, self.snippet_chars = Path(corpus), top_k, snippet_chars
        self.documents: list[dict] | None = None
        self.index: BM25Index | None = None

    def _ensure_index(self) -> None:
        if self.index is None:  # built on first use: a worker that never searches never pays
            try:
                self.documents = load_documents(self.corpus)
            except ValueError as err:
                raise ToolError(str(err)) from None
            self.index = BM25Index([d["text"] for d in self.documents])

    def run(self, context: ToolContext, query: Annotated[str, Field(max_length=200)]) -> str:
        """Search the document collection and return the best-matching passages.

        Args:
            query: keywords to look for
        """
        self._ensure_index()
        hits = self.index.search(query, self.top_k)
        if not hits:
            return f"no document matches {query!r}"
        return "\n\n".join(f"[{rank}] ({self.documents[i]['id']}, score {score:.2f}) "
                           f"{self.documents[i]['text'][:self.snippet_chars]}"
                           for rank, (i, score) in enumerate(hits, 1))
