"""Chat requests -> prompt text, and the constraint that `tool_choice` asks for.

Rendering and parsing live in `internray.models.chat_format` (the agent stage's local client
uses them too); this module adapts them to the API's request type. `tool_guide` constrains the
calls: with tool_choice "required" or a named function the whole reply is calls whose names and
arguments follow the functions' JSON schemas; with "auto" the reply is free until a call opens,
then the call is constrained.
"""
from __future__ import annotations

import json

from internray.models.chat_format import HERMES, ToolFormat, render_chat
from internray.serve.engine.guided import JSON_STYLE
from internray.serve.engine.sampling_params import Guide
from internray.serve.openai.protocol import ChatCompletionRequest, OpenAIError

def request_messages(request: ChatCompletionRequest) -> list[dict]:
    """The request's messages as plain OpenAI dicts with text content."""
    return [m.model_dump(exclude_none=True) | {"content": m.text()} for m in request.messages]


def render_prompt(tokenizer, request: ChatCompletionRequest) -> str:
    try:
        return render_chat(tokenizer, request_messages(request), request.tools, request.tool_choice)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="messages") from e


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
