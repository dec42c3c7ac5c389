"""Chat requests -> prompt text, and model text -> tool calls.

The prompt is the model's own chat template (from its tokenizer), or InternLM's `<|im_start|>`
template for checkpoints without one. Tools reach the model through the template when it knows
about them; otherwise as a system message that asks for calls in the model's tool format, which
`parse_tool_calls` turns back into OpenAI `tool_calls`. Two formats are known: Hermes/Qwen
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the default) and InternLM2's
`<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|>` (chosen when the
template speaks of `<|plugin|>` and the tokenizer has those special tokens). `tool_guide`
constrains the calls: with tool_choice "required" or a named function the whole reply is calls
whose names and arguments follow the functions' JSON schemas; with "auto" the reply is free until
a call opens, then the call is constrained.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from internray.models.export import DEFAULT_CHAT_TEMPLATE
from internray.serve.engine.guided import JSON_STYLE
from internray.serve.engine.sampling_params import Guide
from internray.serve.openai.protocol import ChatCompletionRequest, OpenAIError



@dataclass(frozen=True)
class ToolFormat:
    """How a model writes a call. `open`/`close` are text; `grammar_open`/`grammar_close` spell
    them for the Lark grammar (`<|x|>` there means the special token, "..." literal text)."""

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
TOOL_CALL_OPEN = HERMES.open  # what a stream holds back in the default format


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


def template_messages(request: ChatCompletionRequest, template_knows_tools: bool,
                      fmt: ToolFormat = HERMES) -> list[dict]:
    messages = []
    for m in request.messages:
        content = m.text()
        if m.role == "assistant" and m.tool_calls and not template_knows_tools:
            calls = [fmt.open + json.dumps({"name": c["function"]["name"],
                                            fmt.arguments_key: json.loads(c["function"].get("arguments") or "{}")})
                     + fmt.close for c in m.tool_calls]
            content = (content + "\n" if content else "") + "\n".join(calls)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if template_knows_tools and m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    if request.tools and request.tool_choice != "none" and not template_knows_tools:
        instruction = tools_instruction(request.tools, request.tool_choice, fmt)
        if messages[0]["role"] == "system":
            messages[0]["content"] = instruction + "\n\n" + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    return messages


def render_prompt(tokenizer, request: ChatCompletionRequest) -> str:
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    knows_tools = "tools" in template
    tools = request.tools if knows_tools and request.tool_choice != "none" else None
    try:
        return tokenizer.apply_chat_template(template_messages(request, knows_tools, tool_format(tokenizer)), tools=tools,
                                             chat_template=template, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja raises for conversations the template forbids
        raise OpenAIError(400, f"the model's chat template rejected these messages: {e}", param="messages") from e


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


def call_schema(tools: list[dict], arguments_key: str = "arguments") -> dict:
    """JSON schema of one call: the name of a declared function and arguments valid for it."""
    calls = []
    for tool in tools:
        function = tool.get("function", tool)
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", arguments_key],
                      "properties": {"name": {"const": function["name"]},
                                     arguments_key: function.get("parameters") or {"type": "object"}}})
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tool_guide(request: ChatCompletionRequest, fmt: ToolFormat = HERMES) -> Guide | None:
    """The constraint that tool_choice asks for (None: no tools, or tool_choice "none")."""
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return None
    for tool in request.tools:
        if not isinstance(tool.get("function", tool).get("name"), str):
            raise OpenAIError(400, "every tool needs `function.name`", param="tools")
    tools = request.tools
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in request.tools if t.get("function", t).get("name") == name]
        if not tools:
            raise OpenAIError(400, f"tool_choice names {name!r}, which is not among `tools`", param="tool_choice")
    schema = json.dumps(call_schema(tools, fmt.arguments_key) | {"x-guidance": JSON_STYLE})
    if choice in (None, "auto"):
        return Guide("lark", f"start: %json {schema} {fmt.grammar_close}", trigger=fmt.open, param="tools")
    if choice != "required" and not isinstance(choice, dict):
        raise OpenAIError(400, f"tool_choice must be none, auto, required or a function, not {choice!r}",
                          param="tool_choice")
    repeat = "" if isinstance(choice, dict) or not request.parallel_tool_calls else ' ("\\n" call)*'
    grammar = f"start: call{repeat}\ncall: {fmt.grammar_open} %json {schema} {fmt.grammar_close}"
    return Guide("lark", grammar, param="tools")
