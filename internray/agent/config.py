"""Typed configuration of the agent stage: the model, the agent, its tools, how tools run."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from internray.config import ExistingPath, Section
from internray.openai_client import resolve_backend
from internray.runs import RunSection

BUILTIN_TOOLS = ("calculator", "python", "data_analysis", "search", "http_get")


class LLMSection(Section):
    """The model that drives the agent: any OpenAI-compatible endpoint (internray serve first),
    or a local HF checkpoint loaded in the process that runs the agent."""

    path_or_url: str = Field(description="base URL of an OpenAI-compatible server, or a checkpoint directory")
    backend: Literal["auto", "hf", "openai"] = Field("auto", description="auto: openai for http(s) URLs, else hf")
    name: str | None = Field(None, description="model name sent to the endpoint; default: its first model")
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(256, ge=1, description="per model turn")
    timeout_s: float = Field(120, gt=0)
    max_retries: int = Field(3, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def kind(self) -> str:
        return resolve_backend(self.backend, self.path_or_url)


class AgentSection(Section):
    kind: Literal["function_calling", "react"] = Field(
        "function_calling", description="function_calling: the OpenAI `tools` API; react: Thought/Action/Observation text")
    max_steps: int = Field(6, ge=1, description="model turns before the run stops unanswered")
    system_prompt: str | None = None
    first_tool_choice: Literal["auto", "required", "none"] = Field(
        "auto", description="function_calling: tool_choice of the first turn (later turns use auto); "
                            "required makes a weak model use a tool before it answers")


class PythonToolSection(Section):
    timeout_s: float = Field(10.0, gt=0, description="per call; the session restarts (state lost) after a timeout")
    memory_mb: int = Field(1024, ge=128, description="address-space limit of the session process")
    max_output_bytes: int = Field(20_000, ge=100, description="stdout+stderr kept per call")


class SearchToolSection(Section):
    corpus: ExistingPath | None = Field(None, description="a data-stage run, or Parquet/JSONL with a `text` column")
    top_k: int = Field(3, ge=1)


class HTTPToolSection(Section):
    allowed_hosts: list[str] = Field(default_factory=list, description="host or host:port patterns "
                                                                      "(fnmatch: *.example.com)")
    timeout_s: float = Field(10.0, gt=0)
    max_bytes: int = Field(20_000, ge=100)


class ToolsSection(Section):
    enabled: list[str] = Field(default_factory=lambda: ["calculator", "python"],
                               description=f"builtin tools ({', '.join(BUILTIN_TOOLS)}) and/or import paths "
                                           "`package.module:attr` of a Tool class, Tool instance or function")
    python: PythonToolSection = Field(default_factory=PythonToolSection)
    search: SearchToolSection = Field(default_factory=SearchToolSection)
    http: HTTPToolSection = Field(default_factory=HTTPToolSection)

    @model_validator(mode="after")
    def _check(self) -> ToolsSection:
        for name in self.enabled:
            if name not in BUILTIN_TOOLS and ":" not in name:
                raise ValueError(f"tools.enabled: unknown tool {name!r} (builtin: {', '.join(BUILTIN_TOOLS)}; "
                                 "or an import path package.module:attr)")
        if "search" in self.enabled and self.search.corpus is None:
            raise ValueError("tools.enabled has `search` but tools.search.corpus is not set")
        if "http_get" in self.enabled and not self.http.allowed_hosts:
            raise ValueError("tools.enabled has `http_get` but tools.http.allowed_hosts is empty")
        return self


class ExecutorSection(Section):
    """The pool of Ray actors that run tools (each conversation's state lives on one of them)."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, ge=0)
    max_concurrency: int = Field(8, ge=1, description="calls running at once in one worker")
    call_timeout_s: float = Field(60.0, gt=0, description="a call not answered by then is reported as timed out")


class AgentConfig(Section):
    llm: LLMSection
    agent: AgentSection = Field(default_factory=AgentSection)
    tools: ToolsSection = Field(default_factory=ToolsSection)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    tasks: ExistingPath | None = Field(None, description="JSONL of tasks: {id, task, expected?, files?}")
    concurrency: int = Field(4, ge=1, description="agents running at once in batch mode")
    run: RunSection = Field(default_factory=RunSection)
