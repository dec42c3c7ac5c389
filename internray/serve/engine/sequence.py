"""One request as the engine sees it: tokens so far, its KV-cache block table, its progress."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from internray.serve.engine.detokenizer import IncrementalDetokenizer
from internray.serve.engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    """`num_computed_tokens` counts tokens whose keys/values are in the cache; a step computes the
    next chunk of the rest. When it reaches `num_tokens` the step's logits yield a new token."""

    token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_published_blocks: int = 0  # leading blocks already entered into the prefix cache
    finish_reason: str | None = None
    text: str = ""  # detokenized completion, cut at a stop string
    detokenizer: IncrementalDetokenizer | None = None  # extends `text` token by token (set by the engine)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] = field(default_factory=list)  # per prompt token (None: the first)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    generator: torch.Generator | None = None
    grammar: str | None = None  # compiled guide (guided.py), waiting for its trigger while matcher is None
    matcher: object | None = None  # llguidance.LLMatcher, advanced token by token

    def __post_init__(self):
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * self.num_prompt_tokens
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
