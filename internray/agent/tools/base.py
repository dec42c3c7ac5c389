"""What a tool is: a typed Python method whose signature is its JSON schema.

A tool subclasses `Tool` and implements `run(self, context, ...)` with annotated parameters and
a docstring; the OpenAI function schema (`schema()`) is derived from them with pydantic, and the
same model validates the arguments a model sends, so a bad call is refused with an error naming
the argument before any tool code runs. `context` carries the conversation's session (its own
working directory and per-tool state), which is how a Python interpreter keeps its variables
across calls while many conversations share one tool process. Plain functions become tools with
`function_tool`.
"""
from __future__ import annotations

import base64
import functools
import inspect
import re
import time
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ConfigDict, Field, ValidationError, create_model


class ToolError(Exception):
    """A failure the model should read and can react to (bad input, a limit hit)."""


@dataclass
class ToolContext:
    """One conversation's view of a tool worker: a private directory and per-tool state."""

    session_id: str
    workdir: Path
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolOutput:
    """What a tool returns: text for the model, and PNG images (raw bytes) for the user."""

    text: str
    images: list[bytes] = field(default_factory=list)


@dataclass
class ToolResult:
    """A call's outcome as it travels (Ray, HTTP, traces): JSON-safe, images base64-encoded."""

    name: str
    ok: bool
    content: str
    images: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def for_model(self) -> str:
        """The tool message the model reads; failures are marked so it can correct itself."""
        return self.content if self.ok else f"Error: {self.content}"

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "content": self.content, "images": self.images,
                "duration_s": round(self.duration_s, 4)}

    @classmethod
    def from_dict(cls, data: dict) -> ToolResult:
        return cls(data["name"], data["ok"], data["content"], data.get("images", []), data.get("duration_s", 0.0))


class Tool(ABC):
    """Base of every tool. Subclasses set `name` and implement `run(self, context, **typed args)`."""

    name: str = ""
    stateful: bool = False
    """True when calls keep state in the session (an interpreter): one session's calls take turns."""

    @abstractmethod
    def run(self, context: ToolContext, **arguments) -> ToolOutput | str:
        """The tool's work; its signature (after `context`) and docstring are the schema."""

    def definition(self) -> Callable:
        """The callable whose signature and docstring define the tool's schema."""
        return self.run

    def close_session(self, context: ToolContext) -> None:
        """Release what this tool holds for a session (processes, files); default: nothing."""

    def schema(self) -> dict:
        """The OpenAI `tools` entry for this tool."""
        doc = inspect.getdoc(self.definition()) or ""
        return {"type": "function", "function": {"name": self.name, "description": doc.split("\n\n")[0].strip(),
                                                 "parameters": _parameters_schema(self.definition())}}

    def call(self, context: ToolContext, arguments: dict) -> ToolResult:
        """Validate `arguments`, run, and turn every failure into a result the model can read."""
        start = time.monotonic()
        try:
            checked = _arguments_model(self.definition()).model_validate(arguments)
            output = self.run(context, **{name: getattr(checked, name) for name in type(checked).model_fields})
        except ValidationError as err:
            return self._result(False, _describe_validation(err), start)
        except ToolError as err:
            return self._result(False, str(err), start)
        except Exception as err:  # a bug in a tool must not end the conversation
            return self._result(False, f"{type(err).__name__}: {err}", start)
        if isinstance(output, str):
            output = ToolOutput(output)
        images = [base64.b64encode(png).decode() for png in output.images]
        return self._result(True, output.text, start, images)

    def _result(self, ok: bool, content: str, start: float, images: list[str] | None = None) -> ToolResult:
        return ToolResult(self.name, ok, content, images or [], time.monotonic() - start)


class FunctionTool(Tool):
    """A plain function as a tool; its first parameter, if named `context`, receives the session."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn, self.name = fn, name or fn.__name__
        self.takes_context = next(iter(inspect.signature(fn).parameters), None) == "context"

    def definition(self) -> Callable:
        return self.fn

    def run(self, context: ToolContext, **arguments):
        return self.fn(context, **arguments) if self.takes_context else self.fn(**arguments)


def function_tool(fn: Callable | None = None, *, name: str | None = None):
    """Decorator: `@function_tool` or `@function_tool(name="...")` turns a function into a Tool."""
    if fn is None:
        return lambda f: FunctionTool(f, name)
    return FunctionTool(fn, name)


@functools.cache
def _arguments_model(fn: Callable):
    """A pydantic model of `fn`'s parameters (all but `self` and `context`); unknown arguments are
    errors, so a model misspelling one is told so instead of having it silently dropped."""
    fields = {}
    descriptions = _argument_descriptions(inspect.getdoc(fn) or "")
    hints = typing.get_type_hints(fn, include_extras=True)  # keeps Annotated[str, Field(max_length=...)]
    for name, param in inspect.signature(fn).parameters.items():
        if name in ("self", "context") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name not in hints:
            raise TypeError(f"tool {fn.__qualname__}: parameter `{name}` needs a type annotation (it is the schema)")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (hints[name], Field(default, description=descriptions.get(name)))
    return create_model(f"{fn.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


def _parameters_schema(fn: Callable) -> dict:
    schema = _arguments_model(fn).model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema


def _argument_descriptions(doc: str) -> dict[str, str]:
    """`name: text` lines under a Google-style `Args:` heading."""
    section = re.split(r"^\s*Args:\s*$", doc, maxsplit=1, flags=re.MULTILINE)
    if len(section) < 2:
        return {}
    found: dict[str, str] = {}
    indent, name = None, None
    for line in section[1].splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next heading
        match = re.match(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if match and (indent is None or depth == indent):
            indent, name = depth, match.group(1)
            found[name] = match.group(2).strip()
        elif name:  # a continuation line
            found[name] += " " + line.strip()
    return found


def _describe_validation(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "arguments"
        message = "unknown argument" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"`{where}`: {message}")
    return "invalid arguments: " + "; ".join(problems)
