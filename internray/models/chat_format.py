"""Chat messages -> prompt text with tools, and model text -> OpenAI tool calls.

Shared by everything that talks to a model through its chat template: the serve engine's
OpenAI API and the agent stage's local-model client. The prompt is the model's own chat
template, or InternLM's `<|im_start|>` template for checkpoints without one. Tools reach the
model through the template when it knows about them; otherwise as a system message that asks
for calls in the model's tool format, which `parse_tool_calls` turns back into OpenAI
`tool_calls`. Two formats are known: Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>` (the default) and InternLM2's `<|action_start|><|plugin|>\n{"name": ...,
"parameters": {...}}<|action_end|>` (chosen when the template speaks of `<|plugin|>` and the
tokenizer has those special tokens).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from internray.models.export import DEFAULT_CHAT_TEMPLATE


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes a call. `open`/`close` are text; `grammar_open`/`grammar_close` spell
    them for a Lark grammar (`<|x|>` there means the special token, "..." literal text)."""

    open: str
    close: str
    arguments_key: str
    grammar_open: str
    grammar_close: str
    special_tokens: tuple[str, ...] = ()

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(rf"{re.escape(self.open.strip())}\s*(.*?)\s*(?:{re.escape(self.close)}|$)", re.DOTALL)


HERMES = ToolFormat("<tool_call>", "</tool_call>", "arguments", '"<tool_call>"', '"</tool_call>"')
INTERNLM2 = ToolFormat("<|action_start|><|plugin|>\n", "<|action_end|>", "parameters",
                       '<|action_start|> <|plugin|> "\\n"', "<|action_end|>",
                       special_tokens=("<|action_start|>", "<|plugin|>", "<|action_end|>"))


def tool_format(tokenizer) -> ToolFormat:
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    if "<|plugin|>" in template and all(t in vocab for t in INTERNLM2.special_tokens):
        return INTERNLM2
    return HERMES


def tools_instruction(tools: list[dict], tool_choice, fmt: ToolFormat = HERMES) -> str:
    specs = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    rule = "Call a function only when it helps"
    if tool_choice == "required":
        rule = "You must call at least one function"
    elif isinstance(tool_choice, dict):
        rule = f"You must call the function {tool_choice.get('function', {}).get('name')!r}"
    return (f"You can call these functions:\n{specs}\n{rule}. To call one, reply with "
            f'{fmt.open}{{"name": <function name>, "{fmt.arguments_key}": <JSON object>}}{fmt.close} '
            "for each call and nothing else.")


def template_messages(messages: list[dict], tools: list[dict] | None, tool_choice, template_knows_tools: bool,
                      fmt: ToolFormat = HERMES) -> list[dict]:
    """OpenAI messages (text content) -> what the chat template is given. For a template that does
    not know tools, earlier calls are written out in `fmt` and the tools go into a system message."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls") and not template_knows_tools:
            calls = [fmt.open + json.dumps({"name": c["function"]["name"],
                                            fmt.arguments_key: json.loads(c["function"].get("arguments") or "{}")})
                     + fmt.close for c in m["tool_calls"]]
            content = (content + "\n" if content else "") + "\n".join(calls)
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        if template_knows_tools and m.get("tool_calls"):
            message["tool_calls"] = m["tool_calls"]
        if m.get("tool_call_id"):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    if tools and tool_choice != "none" and not template_knows_tools:
        instruction = tools_instruction(tools, tool_choice, fmt)
        if out[0]["role"] == "system":
            out[0]["content"] = instruction + "\n\n" + out[0]["content"]
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return out


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None, tool_choice=None) -> str:
    """The prompt text for `messages`, ending with the assistant's turn. Raises ValueError when the
    template rejects the conversation (jinja raises for orders it forbids)."""
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    knows_tools = "tools" in template
    shown = template_messages(messages, tools, tool_choice, knows_tools, tool_format(tokenizer))
    try:
        return tokenizer.apply_chat_template(shown, tools=tools if knows_tools and tool_choice != "none" else None,
                                             chat_template=template, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise ValueError(f"the model's chat template rejected these messages: {e}") from e


def parse_tool_calls(text: str, tools: list[dict], fmt: ToolFormat = HERMES) -> tuple[str | None, list[dict]]:
    """Split model text into (content, tool_calls); only calls to declared functions count."""
    names = {t.get("function", t).get("name") for t in tools}
    calls, spans = [], []
    for match in fmt.pattern.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get(fmt.arguments_key, call.get("arguments", {}))
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        spans.append(match.span())
        if any(c["function"] == {"name": call["name"], "arguments": arguments} for c in calls):
            continue  # a weak model repeating the same call: one call, as it meant
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments}})
    for start, end in reversed(spans):
        text = text[:start] + text[end:]
    return (text.strip() or None) if calls else text, calls
