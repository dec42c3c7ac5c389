"""Rule rewards: a completion is scored against the prompt's reference answer.

The rules are the answer checks evaluation harnesses use for short answers; they are exact and
cheap, which is what makes rule-rewarded RL (GRPO on math) work without a reward model.
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def contains(completion: str, answer: str) -> float:
    """1 if the answer appears in the completion (case-insensitive)."""
    return float(answer.strip().lower() in completion.lower())


def exact(completion: str, answer: str) -> float:
    """1 if the completion, stripped of whitespace and a final period, is the answer."""
    return float(completion.strip().rstrip(".").strip().lower() == answer.strip().lower())


def last_number(completion: str, answer: str) -> float:
    """1 if the last number in the completion equals the numeric answer (GSM8K-style)."""
    numbers = NUMBER.findall(completion.replace(",", ""))
    try:
        return float(bool(numbers) and float(numbers[-1]) == float(answer))
    except ValueError:
        return 0.0


RULES = {"contains": contains, "exact": exact, "last_number": last_number}
