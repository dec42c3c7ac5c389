"""The OpenAI endpoints' logic for one model, over an AsyncLLMEngine; no HTTP here.

Each endpoint is an async generator: a non-streaming request yields one response object; a
streaming one yields Server-Sent-Event strings ending in `data: [DONE]`. A refused request raises
OpenAIError before anything is yielded, so the HTTP layer can still choose the status code.
"""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from internray.serve.engine.async_engine import AsyncLLMEngine
from internray.serve.engine.llm_engine import RequestOutput
from internray.serve.engine.sampling_params import InvalidRequest, SamplingParams
from internray.models.chat_format import parse_tool_calls, tool_format
from internray.serve.openai.chat import render_prompt, tool_guide
from internray.serve.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, OpenAIError, new_id, now, usage,
)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.tool_format = tool_format(self.tokenizer)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": now(), "owned_by": "internray",
                "max_model_len": self.max_model_len}

    # -- shared machinery ---------------------------------------------------------------------
    def _max_tokens(self, prompt_len: int, requested: int | None) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                   f"the prompt has {prompt_len} tokens.", param="messages",
                              code="context_length_exceeded")
        if requested is None:
            return room
        if requested < 1:
            raise OpenAIError(400, f"max_tokens must be >= 1 (got {requested})", param="max_tokens")
        if requested > room:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                   f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                                   f"{requested} for the completion).", param="max_tokens",
                              code="context_length_exceeded")
        return requested

    async def _run(self, jobs: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run several sequences at once; yield (choice index, output) as they arrive."""
        request_id = new_id("req")
        streams = [self.engine.generate(f"{request_id}-{i}", ids, params) for i, (ids, params) in enumerate(jobs)]
        try:  # the first output of each stream validates its request before anything is sent
            firsts = await asyncio.gather(*(anext(s) for s in streams))
        except InvalidRequest as e:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise OpenAIError(400, str(e), param=e.param) from e
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for out in stream:
                    await queue.put((i, out))
            except BaseException as e:
                await queue.put((i, e))

        for i, first in enumerate(firsts):
            yield i, first
        live = [i for i, first in enumerate(firsts) if not first.finished]
        tasks = [asyncio.create_task(pump(i, streams[i])) for i in live]
        try:
            remaining = len(live)
            while remaining:
                i, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                remaining -= out.finished
                yield i, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)

    async def _deltas(self, jobs, finals: dict[int, RequestOutput], hold_from: str | None = None):
        """For streaming: (choice, output, new text, its offset, new logprob entries) per output;
        `finals` collects each choice's last output. Text from `hold_from` on is held back."""
        sent, sent_logprobs = [0] * len(jobs), [0] * len(jobs)
        async for i, out in self._run(jobs):
            if out.finished:
                finals[i] = out
            text = out.text if out.finished else out.stable_text
            if hold_from and hold_from in text:
                text = text[:text.index(hold_from)]
            offset = sent[i]
            sent[i] = max(sent[i], len(text))
            new_logprobs = []
            if text[offset:] or out.finished:  # logprobs travel with the text they produced
                new_logprobs = out.logprobs[sent_logprobs[i]:]
                sent_logprobs[i] = len(out.logprobs)
            yield i, out, text[offset:], offset, new_logprobs

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- /v1/completions ---------------------------------------------------------------------
    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError(400, "`prompt` is empty", param="prompt")
        return [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompt]

    def _completion_logprobs(self, infos: list[dict], offset: int) -> dict:
        tokens = [self._token_text(i["token"]) for i in infos]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [i["logprob"] for i in infos],
                "top_logprobs": [{self._token_text(t): lp for t, lp in i["top"]} for i in infos],
                "text_offset": offsets}

    def _echo(self, prompt, ids: list[int], out: RequestOutput, logprobs: int | None) -> tuple[str, dict | None]:
        """The prompt as `echo` returns it, and its logprobs entries (the first token has none). A
        text prompt's tokens are located in it by the tokenizer's offsets, so `text_offset` tells a
        client exactly which tokens cover which characters (how loglikelihood scoring finds the
        continuation)."""
        if isinstance(prompt, str):
            text = prompt
            offsets = [start for start, _ in self.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]]
        else:
            text, offsets, at = self.tokenizer.decode(ids), [], 0
            for token in ids:
                offsets.append(at)
                at += len(self._token_text(token))
        if logprobs is None:
            return text, None
        entries = out.prompt_logprobs
        return text, {"tokens": [self._token_text(t) for t in ids],
                      "token_logprobs": [None if e is None else e["logprob"] for e in entries],
                      "top_logprobs": [None if e is None else {self._token_text(t): lp for t, lp in e["top"]}
                                       for e in entries],
                      "text_offset": offsets}

    async def completions(self, request: CompletionRequest) -> AsyncIterator[dict | str]:
        if request.echo and request.stream:
            raise OpenAIError(400, "`echo` is supported without `stream` only", param="echo")
        if request.max_tokens == 0 and not request.echo:
            raise OpenAIError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
        texts = request.prompt if isinstance(request.prompt, list) and request.prompt and \
            isinstance(request.prompt[0], (str, list)) else [request.prompt]
        prompts = self._prompts(request.prompt)
        guide = request.response_guide()
        prompt_logprobs = request.logprobs if request.echo else None
        jobs = []
        for ids in prompts:
            # max_tokens 0 (echo only): the one token the engine always samples is dropped below
            max_tokens = self._max_tokens(len(ids), request.max_tokens or 1)
            for c in range(request.n):
                params = self._params(request, max_tokens, request.logprobs, c, guide)
                params.prompt_logprobs = prompt_logprobs
                jobs.append((ids, params))
        rid, created = new_id("cmpl"), now()
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        finals: dict[int, RequestOutput] = {}
        async for i, out, delta, offset, new_logprobs in self._deltas(jobs, finals):
            if not request.stream or not (delta or out.finished):
                continue
            logprobs = None if request.logprobs is None else self._completion_logprobs(new_logprobs, offset)
            yield sse(head | {"choices": [{"index": i, "text": delta, "logprobs": logprobs,
                                           "finish_reason": out.finish_reason}]})
        total = self._usage(prompts, request.n, finals)
        if request.stream:
            if request.include_usage:
                yield sse(head | {"choices": [], "usage": total})
            yield DONE
            return
        choices = []
        for i, out in sorted(finals.items()):
            text, logprobs, finish = out.text, out.logprobs, out.finish_reason
            if request.max_tokens == 0:
                text, logprobs, finish = "", [], "length"
            entries = self._completion_logprobs(logprobs, 0) if request.logprobs is not None else None
            if request.echo:
                prompt_index = i // request.n
                prompt_text, prompt_entries = self._echo(texts[prompt_index], prompts[prompt_index], out, request.logprobs)
                if entries is not None:
                    entries = {key: prompt_entries[key] + (entries[key] if key != "text_offset" else
                                                           [len(prompt_text) + o for o in entries[key]])
                               for key in entries}
                text = prompt_text + text
            choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": entries})
        if request.max_tokens == 0:
            total = usage(total["prompt_tokens"], 0, total.get("prompt_tokens_details", {}).get("cached_tokens", 0))
        yield head | {"choices": choices, "usage": total}

    def _params(self, request, max_tokens: int, logprobs: int | None, choice: int, guide=None) -> SamplingParams:
        try:
            return request.sampling_params(max_tokens, logprobs, choice, guide)
        except InvalidRequest as e:
            raise OpenAIError(400, str(e), param=e.param) from e

    @staticmethod
    def _usage(prompts: list[list[int]], n: int, finals: dict[int, RequestOutput]) -> dict:
        completion = sum(len(o.token_ids) for o in finals.values())
        cached = sum(o.num_cached_tokens for o in finals.values())
        return usage(sum(len(p) for p in prompts) * n, completion, cached)

    # -- /v1/chat/completions ----------------------------------------------------------------
    def _chat_logprobs(self, infos: list[dict]) -> dict:
        def entry(token, logprob):
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [entry(i["token"], i["logprob"]) | {"top_logprobs": [entry(t, lp) for t, lp in i["top"]]}
                            for i in infos]}

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[dict | str]:
        prompt = render_prompt(self.tokenizer, request)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        max_tokens = self._max_tokens(len(ids), request.max_completion_tokens or request.max_tokens)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        fmt = self.tool_format
        guide = tool_guide(request, fmt) or request.response_guide()
        tools = request.tools if request.tools and request.tool_choice != "none" else []
        jobs = [(ids, self._params(request, max_tokens, logprobs, c, guide)) for c in range(request.n)]
        if tools and fmt.special_tokens:  # calls are spelled with special tokens: keep them in the text
            for _, params in jobs:
                params.skip_special_tokens = False
        rid, created = new_id("chatcmpl"), now()
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        finals: dict[int, RequestOutput] = {}
        if request.stream:
            for i in range(len(jobs)):
                yield sse(head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
        hold = fmt.open.strip() if tools else None  # a tool call is sent once complete, as `tool_calls`
        async for i, out, delta, _, new_logprobs in self._deltas(jobs, finals, hold):
            if not request.stream:
                continue
            choice = {"index": i, "delta": {"content": delta} if delta else {}, "finish_reason": None,
                      "logprobs": self._chat_logprobs(new_logprobs) if logprobs is not None and new_logprobs else None}
            if out.finished:
                content, calls = parse_tool_calls(out.text, tools, fmt) if tools else (out.text, [])
                if calls:
                    choice["delta"]["tool_calls"] = [c | {"index": k} for k, c in enumerate(calls)]
                choice["finish_reason"] = "tool_calls" if calls else out.finish_reason
            if choice["delta"] or choice["logprobs"] or out.finished:
                yield sse(head | {"choices": [choice]})
        total = self._usage([ids], request.n, finals)
        if request.stream:
            if request.include_usage:
                yield sse(head | {"choices": [], "usage": total})
            yield DONE
            return
        choices = []
        for i, out in sorted(finals.items()):
            content, calls = parse_tool_calls(out.text, tools, fmt) if tools else (out.text, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "finish_reason": "tool_calls" if calls else out.finish_reason,
                            "logprobs": self._chat_logprobs(out.logprobs) if logprobs is not None else None})
        yield head | {"object": "chat.completion", "choices": choices, "usage": total}
