"""The tool library, and `build_tools`: a ToolsSection -> {name: Tool}."""
from __future__ import annotations

import importlib

from internray.agent.config import BUILTIN_TOOLS, ToolsSection
from internray.agent.tools.base import FunctionTool, Tool, ToolContext, ToolError, ToolOutput, ToolResult, function_tool

__all__ = ["Tool", "ToolContext", "ToolError", "ToolOutput", "ToolResult", "FunctionTool", "function_tool",
           "build_tools"]


def build_tools(section: ToolsSection) -> dict[str, Tool]:
    """Instantiate the enabled tools, inside the worker that runs them."""
    tools: dict[str, Tool] = {}
    for entry in section.enabled:
        tool = _builtin(entry, section) if entry in BUILTIN_TOOLS else _import_tool(entry)
        if tool.name in tools:
            raise ValueError(f"tools.enabled: two tools are named {tool.name!r}")
        tools[tool.name] = tool
    return tools


def _builtin(name: str, section: ToolsSection) -> Tool:
    """Each tool's module is imported only when enabled: a calculator worker never loads pandas."""
    if name == "calculator":
        from internray.agent.tools.calculator import Calculator

        return Calculator()
    if name == "search":
        from internray.agent.tools.search import CorpusSearch

        return CorpusSearch(section.search.corpus, section.search.top_k)
    if name == "http_get":
        from internray.agent.tools.http_api import HTTPGet

        return HTTPGet(section.http.allowed_hosts, section.http.timeout_s, section.http.max_bytes)
    from internray.agent.tools.python import DataAnalysis, PythonInterpreter
    from internray.sandbox import SandboxLimits

    limits = SandboxLimits(timeout_s=section.python.timeout_s, memory_mb=section.python.memory_mb,
                           max_output_bytes=section.python.max_output_bytes)
    return {"python": PythonInterpreter, "data_analysis": DataAnalysis}[name](limits)


def _import_tool(path: str) -> Tool:
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"tools.enabled: cannot import {path!r}: {err}") from None
    if isinstance(obj, Tool):
        return obj
    if isinstance(obj, type) and issubclass(obj, Tool):
        return obj()
    if callable(obj):
        return FunctionTool(obj)
    raise ValueError(f"tools.enabled: {path!r} is not a Tool, a Tool class or a function")
