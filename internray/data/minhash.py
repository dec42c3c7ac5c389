"""Vectorised MinHash signatures and LSH band keys (numpy only, no Ray).

Shingles are hashed to 64 bits in one vectorised call (pandas' SipHash over object arrays,
stable across processes), then all `num_perm` hash functions are applied to a whole batch of
shingles at once with multiply-shift hashing, h(x) = (a*x + b) mod 2^64 >> 32 with odd `a`, which
is 2-universal and needs no modulo. Per-document minima come from `np.minimum.reduceat` over cache-sized slices.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from internray.data.clean import words

GROUP_UNITS = 1 << 16
MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant: spreads small code points
ROLL = np.uint64(0x100000001B3)  # FNV prime: odd, spreads bits
SLICE_ROWS = 2048


class MinHasher:
    def __init__(self, num_perm: int = 128, bands: int = 16, rows: int = 8, shingle: str = "word",
                 ngram: int = 5, seed: int = 42):
        if bands * rows != num_perm:
            raise ValueError(f"bands * rows must equal num_perm ({bands} * {rows} != {num_perm})")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.band_mix = rng.integers(1, 2**63, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.num_perm, self.bands, self.rows = num_perm, bands, rows
        self.shingle, self.ngram = shingle, ngram

    def shingles(self, text: str) -> list[str]:
        """Word n-grams (CJK characters count as words) or character n-grams; never empty."""
        if self.shingle == "char":
            units, sep = " ".join(text.lower().split()), ""
        else:
            units, sep = words(text), " "
        n = self.ngram
        if len(units) <= n:
            return [sep.join(units) if sep else units] if units else [""]
        return list({sep.join(units[i : i + n]) for i in range(len(units) - n + 1)})

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures of the `shingles` sets."""
        out = np.full((len(texts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        start = 0
        while start < len(texts):  # groups of documents bound the memory held at once
            group, count = [], 0
            for text in texts[start:]:
                group.append(self._unit_hashes(text))
                count += len(group[-1])
                if count >= GROUP_UNITS:
                    break
            hashed, doc_of_row = self._shingle_hashes(group)
            self._lower_to_minima(out[start : start + len(group)], hashed, doc_of_row)
            start += len(group)
        return out

    def _unit_hashes(self, text: str) -> np.ndarray:
        """One 64-bit value per unit: a word's SipHash, or a character's code point (mixed)."""
        if self.shingle == "char":
            points = np.frombuffer(" ".join(text.lower().split()).encode("utf-32-le"), dtype=np.uint32)
            return points.astype(np.uint64) * MIX
        units = words(text)
        return pd.util.hash_array(np.array(units, dtype=object), categorize=False).astype(np.uint64)

    def _shingle_hashes(self, group: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hashes of every n-gram window of every document, and the document of each.

        A window's hash is a polynomial of its units' values, computed for all windows of all
        documents in n vectorised steps. Windows repeat inside a document, which leaves its
        minima unchanged, so no de-duplication is needed. A document shorter than n units is
        one shingle (its whole text), as in `shingles`.
        """
        n = self.ngram
        group = [g if len(g) else np.zeros(1, dtype=np.uint64) for g in group]
        lengths = np.array([len(g) for g in group])
        values = np.concatenate([*group, np.zeros(n, dtype=np.uint64)])
        doc = np.repeat(np.arange(len(group)), lengths)
        pos = np.arange(len(doc))
        end = np.cumsum(lengths)[doc]
        keep = (pos + n <= end) | ((lengths[doc] < n) & (pos == end - lengths[doc]))
        acc = np.zeros(len(doc), dtype=np.uint64)
        for k in range(n):
            acc = acc * ROLL + np.where(pos + k < end, values[pos + k], np.uint64(0))  # wraps mod 2^64
        return acc[keep], doc[keep]

    def _lower_to_minima(self, out: np.ndarray, hashed: np.ndarray, doc_of_row: np.ndarray) -> None:
        for lo in range(0, len(hashed), SLICE_ROWS):  # slices small enough to stay in cache
            permuted = np.multiply.outer(hashed[lo : lo + SLICE_ROWS], self.a)  # wraps mod 2^64 by design
            permuted += self.b
            permuted >>= np.uint64(32)
            docs = doc_of_row[lo : lo + SLICE_ROWS]
            starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
            minima = np.minimum.reduceat(permuted, starts, axis=0).astype(np.uint32)
            rows = docs[starts]
            out[rows] = np.minimum(out[rows], minima)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: one key per band; equal keys mean equal band rows (w.h.p.)."""
        banded = signatures.reshape(len(signatures), self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (banded * self.band_mix[None, None, :]).sum(axis=2, dtype=np.uint64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))
