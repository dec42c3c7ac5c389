"""Text normalisation and quality filters for English, Chinese and code.

Filters follow the Gopher rules where those make sense (length, symbol/letter ratios, duplicate
lines, top 2-gram and duplicated 5-gram coverage). "Words" are whitespace tokens, except that
CJK characters each count as a word, so the same rules work on Chinese. Code keeps only the
rules that do not punish normal code (repetition of short n-grams is normal there).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

import pyarrow as pa

from internray.data.config import CleanSection

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_INLINE_SPACE = re.compile(r"[ \u00a0\u3000]{2,}|[\u00a0\u3000]")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORDS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|function |return\b|for .*:\s*$|if .*:\s*$"
    r"|\}|.*[;{]\s*$|@\w+|#!)"
)


MIN_DUP_LINE_CHARS = 12


def normalize(text: str, form: str) -> str:
    """Unicode form, no control characters, tidy whitespace; line structure is kept (code needs it)."""
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(_tidy_line(line) for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _tidy_line(line: str) -> str:
    """Keep the indentation (code needs it), collapse space runs after it, drop trailing space."""
    body = line.lstrip(" \t")
    return line[: len(line) - len(body)] + _INLINE_SPACE.sub(" ", body).rstrip() if body else ""


def detect_kind(text: str) -> str:
    """`code`, `zh`, `en` or `other`: a cheap script detector, good enough to route filters."""
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(bool(_CODE_LINE.match(line)) for line in lines) / len(lines) >= 0.25:
        return "code"
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "other"
    cjk = len(_CJK.findall(text))
    if cjk / len(letters) >= 0.3:
        return "zh"
    latin = sum(c < "\u0250" for c in letters)
    return "en" if latin / len(letters) >= 0.8 else "other"


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def quality_problem(text: str, kind: str, cfg: CleanSection) -> str | None:
    """The first filter a document fails, as a reason name, or None if it passes all."""
    if kind not in cfg.languages:
        return f"language_{kind}"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    non_space = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in non_space) / max(1, len(non_space))
    if alpha < (cfg.code_min_alpha_ratio if kind == "code" else cfg.min_alpha_ratio):
        return "low_alpha_ratio"
    lines = [line for line in text.split("\n") if line.strip()]
    if max((len(line) for line in lines), default=0) > cfg.max_line_chars:
        return "line_too_long"
    if _dup_line_fraction(lines) > (cfg.code_max_dup_line_fraction if kind == "code" else cfg.max_dup_line_fraction):
        return "duplicate_lines"
    if kind == "code":
        return None
    tokens = words(text)
    if _top_ngram_fraction(tokens, 2) > cfg.max_top_2gram_fraction:
        return "repeated_2gram"
    if _dup_ngram_fraction(tokens, 5) > cfg.max_dup_5gram_fraction:
        return "repeated_5grams"
    return None


def _dup_line_fraction(lines: list[str]) -> float:
    """Share of lines repeated elsewhere; short lines (`else:`, `}`, `return`) are structure, not spam."""
    if not lines:
        return 0.0
    counts = Counter(line.strip() for line in lines)
    return sum(c for line, c in counts.items() if c > 1 and len(line) >= MIN_DUP_LINE_CHARS) / len(lines)


def _top_ngram_fraction(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 5:
        return 0.0
    gram, count = Counter(grams).most_common(1)[0]
    total = sum(len(t) for t in tokens)
    return count * sum(len(t) for t in gram) / max(1, total)


def _dup_ngram_fraction(tokens: list[str], n: int) -> float:
    """Share of characters covered by n-grams that occur more than once (Gopher's definition)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 5:
        return 0.0
    counts = Counter(grams)
    covered = [False] * len(tokens)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    total = sum(len(t) for t in tokens)
    return sum(len(t) for t, c in zip(tokens, covered) if c) / max(1, total)


def clean_batch(batch: pa.Table, cfg: dict, kinds: dict[str, str]) -> pa.Table:
    """Ray Data UDF: normalise kept rows and mark those failing a filter `filter:<reason>`.

    `kinds` maps source names to a declared kind (`code` for a source tree, say), else `auto`.
    """
    section = CleanSection.model_validate(cfg)
    texts, drops = [], []
    columns = (batch.column(c).to_pylist() for c in ("text", "drop", "source"))
    for text, drop, source in zip(*columns):
        if drop is None:
            text = normalize(text, section.unicode_form)
            kind = kinds.get(source, "auto")
            problem = quality_problem(text, detect_kind(text) if kind == "auto" else kind, section)
            drop = f"filter:{problem}" if problem else None
        texts.append(text)
        drops.append(drop)
    batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    return batch.set_column(batch.schema.get_field_index("drop"), "drop", pa.array(drops, pa.string()))
