"""Vectorised MinHash signatures and LSH band keys (numpy only, no Ray).

Shingles are hashed to 64 bits in one vectorised call (pandas' SipHash over object arrays,
stable across processes), then all `num_perm` hash functions are applied to a whole batch of
shingles at once with multiply-shift hashing, h(x) = (a*x + b) mod 2^64 >> 32 with odd `a`, which
is 2-universal and needs no modulo. Per-document minima come from one `np.minimum.reduceat`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from internray.data.clean import words

CHUNK_SHINGLES = 1 << 14


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
        """(len(texts), num_perm) uint32 MinHash signatures."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        start = 0
        while start < len(texts):
            shingle_lists, count = [], 0
            for text in texts[start:]:
                shingle_lists.append(self.shingles(text))
                count += len(shingle_lists[-1])
                if count >= CHUNK_SHINGLES:
                    break
            out[start : start + len(shingle_lists)] = self._min_hashes(shingle_lists)
            start += len(shingle_lists)
        return out

    def _min_hashes(self, shingle_lists: list[list[str]]) -> np.ndarray:
        flat = np.array([s for shingles in shingle_lists for s in shingles], dtype=object)
        hashed = pd.util.hash_array(flat, categorize=False).astype(np.uint64)
        permuted = np.multiply.outer(hashed, self.a)  # wraps mod 2^64 by design
        permuted += self.b
        permuted >>= np.uint64(32)
        offsets = np.cumsum([0] + [len(s) for s in shingle_lists[:-1]])
        return np.minimum.reduceat(permuted.astype(np.uint32), offsets, axis=0)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: one key per band; equal keys mean equal band rows (w.h.p.)."""
        banded = signatures.reshape(len(signatures), self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (banded * self.band_mix[None, None, :]).sum(axis=2, dtype=np.uint64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))
