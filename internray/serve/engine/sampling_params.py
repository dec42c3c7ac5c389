"""What one request asks the sampler and the stop checker to do."""
from __future__ import annotations

import json
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request the engine refuses as given (the API turns it into a 400 naming `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Guide:
    """A constraint on the output (see guided.py): a JSON schema (as JSON text), a Lark grammar or
    a regex. With a `trigger` the sequence runs free until its text reaches the trigger, and only
    what follows is constrained. `param` is the request field a bad spec is blamed on."""

    kind: str  # "json_schema" | "lark" | "regex"
    spec: str
    trigger: str | None = None
    param: str = "response_format"

    @staticmethod
    def json_schema(schema: dict, **kw) -> "Guide":
        return Guide("json_schema", json.dumps(schema), **kw)


@dataclass
class SamplingParams:
    """OpenAI's sampling fields plus vLLM's extras (top_k, repetition_penalty, stop_token_ids).

    temperature 0 means greedy. Penalties follow their sources: repetition_penalty is CTRL/HF's
    (divide positive logits of every token seen, prompt included, multiply negative ones);
    presence/frequency penalties are OpenAI's (subtract, over generated tokens only).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (eval's loglikelihood)
    guide: Guide | None = None
    skip_special_tokens: bool = True  # False where special tokens carry meaning (InternLM2 tool calls)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (len(self.stop) <= 16 and all(self.stop), "stop", "at most 16 non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be in [0, 20]"),
        ]
        for ok, param, why in checks:
            if not ok:
                raise InvalidRequest(f"`{param}` {why} (got {getattr(self, param)!r})", param)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
