"""The model under test behind two calls: `loglikelihood` and `generate`.

Both backends score a continuation the same way, so a local checkpoint and the same checkpoint
behind an OpenAI-compatible server give the same numbers: the tokenizer encodes context +
continuation as one string, and the continuation is every token that starts at or after the
context's last character (found from character offsets: the tokenizer's own locally, `echo`'s
`text_offset` from a server). Encoding the whole string once is what the model sees when it reads
the prompt, and it needs no access to a remote model's tokenizer.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from internray.eval.config import ModelSection
from internray.openai_client import OpenAIClient


@dataclass(frozen=True)
class Generation:
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    n: int = 1
    seed: int = 0


class Score(NamedTuple):
    """A continuation's sum of token logprobs, whether greedy decoding would produce it, and its
    token count (what perplexity divides by)."""

    logprob: float
    greedy: bool
    tokens: int


class HFBackend:
    """A local HF checkpoint, batched; runs inside an eval worker actor."""

    def __init__(self, model: ModelSection):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = model.device if model.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device, self.batch_size, self.chat = torch.device(device), model.batch_size, model.chat
        self.tokenizer = AutoTokenizer.from_pretrained(model.path_or_url)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model.path_or_url, dtype=getattr(torch, model.dtype))
        self.model.to(self.device).eval()

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[Score]:
        """Each (context, continuation)'s Score.

        Requests whose continuation is a single token after the same context tokens (a multiple-
        choice question's " A".." D") share one forward pass over the context: its last position
        scores them all, as lm-eval groups them. Others get a pass over context + continuation."""
        rows: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []  # (input ids, (request, start, targets))
        shared: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for i, (context, continuation) in enumerate(requests):
            tokens, first = self._encode(context, continuation)
            if len(tokens) - first == 1:
                shared.setdefault(tuple(tokens[:first]), []).append((i, first, tokens[first:]))
            else:
                rows.append((tokens, [(i, first, tokens[first:])]))
        rows += [(list(context), members) for context, members in shared.items()]
        rows.sort(key=lambda row: -len(row[0]))  # similar lengths batch together
        results: list[Score | None] = [None] * len(requests)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            ids = torch.full((len(batch), len(batch[0][0])), self.tokenizer.pad_token_id, dtype=torch.long)
            for r, (tokens, _) in enumerate(batch):
                ids[r, :len(tokens)] = torch.tensor(tokens)
            with torch.inference_mode():  # right padding: real positions never attend to pads
                logprobs = self.model(ids.to(self.device)).logits.float().log_softmax(-1).cpu()
            for r, (_, members) in enumerate(batch):
                for i, first, targets in members:
                    scores = logprobs[r, first - 1:first - 1 + len(targets)]
                    target = torch.tensor(targets)
                    results[i] = Score(float(scores.gather(1, target[:, None]).sum()),
                                       bool((scores.argmax(-1) == target).all()), len(targets))
        return results

    def _encode(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of context + continuation, and the index of the continuation's first token."""
        enc = self.tokenizer(context + continuation, return_offsets_mapping=True)
        first = next((t for t, (s, e) in enumerate(enc["offset_mapping"]) if s >= len(context) and e > s), None)
        if not first:  # None, or 0: nothing before it to predict it from
            raise ValueError(f"continuation {continuation!r} has no token of its own after the context")
        return enc["input_ids"], first

    def generate(self, prompts: list[str], gen: Generation) -> list[list[str]]:
        outputs = []
        self.tokenizer.padding_side = "left"
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            if self.chat:  # the template writes its own special tokens
                batch = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                            add_generation_prompt=True) for p in batch]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True,
                                 add_special_tokens=not self.chat).to(self.device)
            torch.manual_seed(gen.seed + start)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, max_new_tokens=gen.max_tokens, do_sample=gen.temperature > 0,
                    temperature=gen.temperature or None, top_p=None, top_k=None, num_return_sequences=gen.n,
                    pad_token_id=self.tokenizer.pad_token_id, stop_strings=list(gen.stop) or None,
                    tokenizer=self.tokenizer)  # a batch ends when every sequence hit a stop string
            texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs.extend([cut_at_stop(t, gen.stop) for t in texts[i * gen.n:(i + 1) * gen.n]]
                           for i in range(len(batch)))
        return outputs


class OpenAIBackend(OpenAIClient):
    """Any OpenAI-compatible `/v1/completions` endpoint (`/v1/chat/completions` for generation in
    chat mode), with bounded concurrency, a timeout per request, and retries (with backoff) on
    connection errors, 429 and 5xx."""

    def __init__(self, model: ModelSection):
        super().__init__(model.path_or_url, model.api_key_env, model.timeout_s, model.max_retries)
        self.name = model.name or self.first_model()
        self.chat = model.chat
        self.pool = ThreadPoolExecutor(model.max_concurrency)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[Score]:
        return list(self.pool.map(lambda r: self._loglikelihood(*r), requests))

    def _loglikelihood(self, context: str, continuation: str) -> Score:
        # lm-eval's request: echo the prompt with its logprobs. One token is generated because not
        # every server accepts max_tokens=0; it lies past usage.prompt_tokens and is ignored.
        body = {"model": self.name, "prompt": context + continuation, "max_tokens": 1, "temperature": 0,
                "echo": True, "logprobs": 1}
        reply = self.request("POST", "/v1/completions", body)
        lp = reply["choices"][0]["logprobs"]
        n = reply["usage"]["prompt_tokens"]
        picked = [i for i in range(1, n) if lp["text_offset"][i] >= len(context)]
        if not picked:
            raise ValueError(f"continuation {continuation!r} has no token of its own after the context")
        greedy = all(max(lp["top_logprobs"][i], key=lp["top_logprobs"][i].get) == lp["tokens"][i] for i in picked)
        return Score(sum(lp["token_logprobs"][i] for i in picked), greedy, len(picked))

    def generate(self, prompts: list[str], gen: Generation) -> list[list[str]]:
        def one(prompt: str) -> list[str]:
            body = {"model": self.name, "max_tokens": gen.max_tokens, "temperature": gen.temperature,
                    "n": gen.n, "seed": gen.seed}
            body |= {"messages": [{"role": "user", "content": prompt}]} if self.chat else {"prompt": prompt}
            if gen.stop:
                body["stop"] = list(gen.stop)[:4]  # OpenAI's limit; the rest are applied here
            path = "/v1/chat/completions" if self.chat else "/v1/completions"
            choices = sorted(self.request("POST", path, body)["choices"], key=lambda c: c["index"])
            return [cut_at_stop(c["message"]["content"] if self.chat else c["text"], gen.stop) for c in choices]
        return list(self.pool.map(one, prompts))


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def make_backend(model: ModelSection):
    if model.kind == "openai":
        return OpenAIBackend(model)
    if not Path(model.path_or_url, "config.json").is_file():
        raise FileNotFoundError(f"model {model.path_or_url}: not an HF checkpoint directory (no config.json)")
    return HFBackend(model)
