"""The model behind an agent: one call, `chat(messages, tools, tool_choice, stop) -> Reply`.

`OpenAIChat` talks to any OpenAI-compatible endpoint; against internray serve, tool calls are
grammar-constrained to the functions' schemas (the serve engine's structured output), which is
what makes small models usable tool callers. `HFChat` runs a local checkpoint in-process with
the same chat template and tool-call parsing as the server (`internray.models.chat_format`),
but without constrained decoding: a weak model's malformed call comes back as plain text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from internray.agent.config import LLMSection


@dataclass
class Reply:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0

    def message(self) -> dict:
        """The assistant message to append to the conversation."""
        message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class OpenAIChat:
    def __init__(self, section: LLMSection):
        from internray.openai_client import OpenAIClient

        self.client = OpenAIClient(section.path_or_url, section.api_key_env, section.timeout_s, section.max_retries)
        self.name = section.name or self.client.first_model()
        self.temperature, self.max_tokens = section.temperature, section.max_tokens

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | None = None,
             stop: list[str] | None = None) -> Reply:
        body = {"model": self.name, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        if tools:
            body |= {"tools": tools, "tool_choice": tool_choice or "auto"}
        if stop:
            body["stop"] = stop
        start = time.monotonic()
        reply = self.client.request("POST", "/v1/chat/completions", body)
        message, usage = reply["choices"][0]["message"], reply.get("usage") or {}
        return Reply(message.get("content"), message.get("tool_calls") or [], usage.get("prompt_tokens", 0),
                     usage.get("completion_tokens", 0), time.monotonic() - start)


class HFChat:
    def __init__(self, section: LLMSection):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(section.path_or_url)
        self.model = AutoModelForCausalLM.from_pretrained(section.path_or_url, dtype=getattr(torch, section.dtype))
        self.model.eval()
        self.name = section.name or section.path_or_url
        self.temperature, self.max_tokens = section.temperature, section.max_tokens

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | None = None,
             stop: list[str] | None = None) -> Reply:
        import torch

        from internray.models.chat_format import parse_tool_calls, render_chat, tool_format

        start = time.monotonic()
        prompt = render_chat(self.tokenizer, messages, tools, tool_choice)
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(ids, max_new_tokens=self.max_tokens, stop_strings=stop or None,
                                      tokenizer=self.tokenizer, pad_token_id=self.tokenizer.eos_token_id, **sampling)
        new = out[0, ids.shape[1]:]
        fmt = tool_format(self.tokenizer)
        text = self.tokenizer.decode(new, skip_special_tokens=not fmt.special_tokens)
        for cut in [*(stop or ()), self.tokenizer.eos_token or "\0"]:
            text = text.split(cut)[0]
        content, calls = (parse_tool_calls(text, tools, fmt) if tools and tool_choice != "none" else (text, []))
        return Reply(content, calls, ids.shape[1], len(new), time.monotonic() - start)


def make_llm(section: LLMSection):
    return OpenAIChat(section) if section.kind == "openai" else HFChat(section)
