"""Typed configuration of an eval run: which model, which benchmarks, how the work is spread."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from internray.config import Section
from internray.openai_client import resolve_backend
from internray.runs import RunSection


class ModelSection(Section):
    """The model under test: a local HF checkpoint (loaded inside each worker actor) or any
    OpenAI-compatible endpoint (internray serve, vLLM, LMDeploy, a hosted API)."""

    path_or_url: str = Field(description="checkpoint directory, or base URL of an OpenAI-compatible server")
    backend: Literal["auto", "hf", "openai"] = Field("auto", description="auto: openai for http(s) URLs, else hf")
    name: str | None = Field(None, description="model name reported (and sent to an endpoint); default: "
                                                "the directory name, or the endpoint's first model")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the endpoint's key")
    chat: bool = Field(False, description="generate benchmarks: send each prompt as one user message (the "
                       "checkpoint's chat template, or /v1/chat/completions), as instruct models expect; "
                       "likelihood benchmarks stay on raw text")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1, description="hf: sequences per forward pass")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight per worker")
    timeout_s: float = Field(120, gt=0, description="openai: per request")
    max_retries: int = Field(3, ge=0, description="openai: per request, on connection errors, 429 and 5xx")

    @property
    def kind(self) -> str:
        return resolve_backend(self.backend, self.path_or_url)


class ContaminationSection(Section):
    """Check benchmark items against the corpus a data run actually produced (its n-gram index)."""

    data_run: Path | None = Field(None, description="a data-stage run directory with an ngram_index output")
    threshold: float = Field(0.5, gt=0, le=1, description="an item is contaminated when at least this "
                                                          "fraction of its n-grams is in the corpus")
    order_test: bool = Field(False, description="also the model-side test: is each multiple-choice item likelier "
                                                "in its published option order than reordered (eval/contamination.py)")
    permutations: int = Field(4, ge=1, le=23, description="order test: reorderings scored per item")


class NeedleSection(Section):
    """The `needle` dataset: one item per (context length, depth), see eval/needle.py."""

    context_lengths: list[int] = Field(default_factory=lambda: [512, 1024, 2048], min_length=1)
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    max_tokens: int = Field(32, ge=1)
    tokenizer: str | None = Field(None, description="a local checkpoint or tokenizer directory that counts context "
                                  "lengths in tokens for an endpoint (default: the model's own when local, else "
                                  "4 characters per token)")


class JudgeSection(Section):
    """The judge for `judged` benchmarks (eval/judge.py): any OpenAI-compatible chat model."""

    model: ModelSection | None = None
    mode: Literal["single", "pairwise"] = "single"
    baseline_run: Path | None = Field(None, description="pairwise: the eval run whose answers are compared")


class EvalConfig(Section):
    model: ModelSection
    datasets: list[str] = Field(min_length=1, description="builtin names (mmlu, humaneval, needle, essays) or "
                                                          "benchmark spec YAML files")
    limit: int | None = Field(None, ge=1, description="first N items of each dataset (after a seeded shuffle "
                                                      "when shuffle is on)")
    shuffle: bool = Field(False, description="sample the `limit` items at random (seeded) instead of the first")
    seed: int = 0
    shard_size: int = Field(32, ge=1, description="items per task: the unit of caching, retry and progress")
    num_workers: int = Field(2, ge=1, description="Ray actors running tasks in parallel")
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_task_retries: int = Field(2, ge=0, description="a failing task is retried this often, then reported")
    sandbox_timeout_s: float = Field(10.0, gt=0, description="code benchmarks: per program")
    sandbox_memory_mb: int = Field(1024, ge=64)
    needle: NeedleSection = Field(default_factory=NeedleSection)
    judge: JudgeSection = Field(default_factory=JudgeSection)
    contamination: ContaminationSection = Field(default_factory=ContaminationSection)
    run: RunSection = Field(default_factory=RunSection)
