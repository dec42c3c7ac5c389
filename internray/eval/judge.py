"""LLM-as-judge for open-ended answers, with any OpenAI-compatible model as the judge.

Two protocols, MT-bench's (Zheng et al., 2023), which OpenCompass's subjective evaluation also
follows:
- single: the judge rates one answer from 1 to 10 and must end with "Rating: [[n]]"; the item
  scores n / 10.
- pairwise: the judge compares the answer with a baseline run's answer to the same question and
  ends with "[[A]]", "[[B]]" or "[[C]]" (tie). Judges favour a position, so every pair is judged
  twice with the answers swapped; the item scores 1 when both verdicts prefer the model, 0 when
  both prefer the baseline, 0.5 otherwise (a tie, or the verdict flipped with the order).
A reply that does not follow the format is retried once, then scored as unparseable (None) and
counted, never silently as 0.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from internray.eval.backends import OpenAIBackend
from internray.eval.config import ModelSection

SINGLE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Consider helpfulness, relevance, accuracy, depth "
    "and level of detail.{reference_note} Begin with a short explanation, then rate the response on a "
    "scale of 1 to 10 by strictly following this format: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n{reference}[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]")
PAIRWISE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Choose the assistant that follows the user's "
    "instructions and answers the question better. Avoid any position bias: the order of the responses "
    "must not influence your decision, nor their length.{reference_note} Begin with a short explanation, "
    "then output your final verdict by strictly following this format: \"[[A]]\" if assistant A is "
    "better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.\n\n"
    "[User Question]\n{question}\n\n{reference}[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]")
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(reply: str) -> float | None:
    match = _RATING.findall(reply)
    if not match:
        return None
    rating = float(match[-1])
    return rating if 1 <= rating <= 10 else None


def parse_verdict(reply: str) -> str | None:
    match = _VERDICT.findall(reply)
    return match[-1] if match else None


def _reference(reference: str | None) -> dict:
    if not reference:
        return {"reference_note": "", "reference": ""}
    return {"reference_note": " A reference answer is given; compare against it.",
            "reference": f"[Reference Answer]\n{reference}\n\n"}


class Judge:
    """Asks the judge model, `max_concurrency` requests at a time, greedy (temperature 0)."""

    def __init__(self, model: ModelSection, max_tokens: int = 512):
        self.client, self.max_tokens = OpenAIBackend(model), max_tokens
        self.pool = ThreadPoolExecutor(model.max_concurrency)

    def _ask(self, prompt: str, parse):
        for _ in range(2):  # one retry for a reply that ignored the format
            body = {"model": self.client.name, "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0, "max_tokens": self.max_tokens}
            reply = self.client.request("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""
            parsed = parse(reply)
            if parsed is not None:
                return parsed, reply
        return None, reply

    def single(self, question: str, answer: str, reference: str | None = None) -> dict:
        rating, reply = self._ask(SINGLE.format(question=question, answer=answer, **_reference(reference)),
                                  parse_rating)
        return {"rating": rating, "score": None if rating is None else rating / 10, "judgment": reply[-1000:]}

    def pairwise(self, question: str, answer: str, baseline: str, reference: str | None = None) -> dict:
        """Judged in both orders; 1 = the model wins, 0 = the baseline wins, 0.5 = tie or inconsistent."""
        ref = _reference(reference)
        first, reply1 = self._ask(PAIRWISE.format(question=question, answer_a=answer, answer_b=baseline, **ref),
                                  parse_verdict)
        second, reply2 = self._ask(PAIRWISE.format(question=question, answer_a=baseline, answer_b=answer, **ref),
                                   parse_verdict)
        if first is None or second is None:
            return {"verdicts": [first, second], "score": None, "judgment": (reply1 + "\n---\n" + reply2)[-1000:]}
        model_wins = (first == "A") + (second == "B")
        baseline_wins = (first == "B") + (second == "A")
        score = 1.0 if model_wins == 2 else 0.0 if baseline_wins == 2 else 0.5
        return {"verdicts": [first, second], "score": score, "judgment": (reply1 + "\n---\n" + reply2)[-1000:]}

    def judge_all(self, jobs: list[dict], mode: str) -> list[dict]:
        """jobs: {question, answer, reference, baseline (pairwise)} -> one result each, in order."""
        if mode == "single":
            return list(self.pool.map(lambda j: self.single(j["question"], j["answer"], j.get("reference")), jobs))
        return list(self.pool.map(lambda j: self.pairwise(j["question"], j["answer"], j["baseline"],
                                                           j.get("reference")), jobs))
