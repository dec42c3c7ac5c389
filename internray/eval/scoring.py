"""Predictions -> scores: accuracy for multiple choice, exact match, pass@k for code.

Scoring is separate from inference so that a cached prediction file can be rescored (a fixed
answer extractor, another k) without calling the model again.
"""
from __future__ import annotations

import math
import re

import ray

from internray.eval.benchmarks import BenchmarkSpec, gold_index
from internray.sandbox import SandboxLimits, check_program


def score_choice(spec: BenchmarkSpec, item: dict, prediction: dict) -> dict:
    """The label whose continuation is most likely wins (ties: the first, as argmax does)."""
    lls = prediction["loglikelihoods"]
    pred = max(range(len(lls)), key=lls.__getitem__)
    gold = gold_index(spec, item)
    return {"pred": spec.labels[pred], "gold": spec.labels[gold], "correct": pred == gold}


def extract_answer(spec: BenchmarkSpec, completion: str) -> str:
    if spec.extract:
        match = re.search(spec.extract, completion)
        return match.group(1).strip() if match else ""
    return completion.strip()


def normalize(text: str) -> str:
    return " ".join(text.lower().replace(",", "").split()).rstrip(".")


def score_generate(spec: BenchmarkSpec, item: dict, prediction: dict) -> dict:
    answer = extract_answer(spec, prediction["completions"][0])
    gold = str(item[spec.answer_field])
    if spec.match == "key_phrases":
        phrases = [p for p in gold.lower().split("|") if p]
        return {"pred": answer, "gold": gold, "correct": sum(p in answer.lower() for p in phrases) / len(phrases)}
    return {"pred": answer, "gold": gold, "correct": normalize(answer) == normalize(gold)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@ray.remote(num_cpus=0.5)
def run_checks(programs: list[tuple[str, str, str, str]], limits: SandboxLimits) -> list[dict]:
    """Sandboxed test runs as a Ray task: code scoring spreads over the cluster like inference."""
    results = []
    for prompt, completion, test, entry_point in programs:
        r = check_program(prompt, completion, test, entry_point, limits)
        results.append({"passed": r.passed, "status": r.status, "detail": r.detail[-300:]})
    return results


def score_code(spec: BenchmarkSpec, items: list[dict], predictions: list[dict], limits: SandboxLimits,
               chunk: int = 8) -> list[dict]:
    """Run every completion against its item's tests in the sandbox, `chunk` programs per Ray task."""
    programs, owners = [], []
    for index, (item, prediction) in enumerate(zip(items, predictions, strict=True)):
        for completion in prediction["completions"]:
            programs.append((prediction["prompt"], completion, item[spec.test_field], item[spec.entry_point_field]))
            owners.append(index)
    refs = [run_checks.remote(programs[i:i + chunk], limits) for i in range(0, len(programs), chunk)]
    checks = [r for batch in ray.get(refs) for r in batch]
    scored = [{"runs": []} for _ in items]
    for owner, check in zip(owners, checks, strict=True):
        scored[owner]["runs"].append(check)
    for entry in scored:
        n, c = len(entry["runs"]), sum(r["passed"] for r in entry["runs"])
        entry.update({f"pass@{k}": pass_at_k(n, c, k) for k in spec.k if k <= n})
        entry["correct"] = c > 0
    return scored
