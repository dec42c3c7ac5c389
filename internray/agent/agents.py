"""Agents: a model, tools and a loop that ends with an answer, an error, or the step limit.

Two protocols, one trace. `FunctionCallingAgent` uses the OpenAI `tools` API: the model returns
structured `tool_calls` (several at once run in parallel) and reads each result as a `tool`
message. `ReActAgent` uses Lagent's text protocol (Thought / Action / Action Input / Observation /
Final Answer) for models or endpoints without function calling. Both feed tool errors back to
the model so it can correct itself, stop after `max_steps` model turns, and record a `Trace`
(every thought, call, result and timing) that is saved as JSON.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

from internray.agent.executor import ToolExecutor
from internray.agent.tools import ToolResult
from internray.runs import write_json


@dataclass
class ToolCallRecord:
    id: str
    name: str
    arguments: str
    result: dict


@dataclass
class Step:
    index: int
    thought: str | None
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    llm_s: float = 0.0
    tools_s: float = 0.0


@dataclass
class Trace:
    task: str
    agent: str
    model: str
    session_id: str
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    status: str = "running"
    """answered; max_steps (the limit came first); error (the model could not be reached)."""
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0

    @property
    def tool_calls(self) -> list[ToolCallRecord]:
        return [call for step in self.steps for call in step.tool_calls]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> Path:
        return write_json(path, self.to_dict())


class Agent(ABC):
    """The loop both protocols share: model turn, tool calls, repeat; the trace records it all."""

    kind = ""
    default_system_prompt = "You are a helpful assistant. Use the tools when they help, then answer briefly."

    def __init__(self, llm, tools: ToolExecutor, max_steps: int = 6, system_prompt: str | None = None):
        self.llm, self.tools, self.max_steps = llm, tools, max_steps
        self.system_prompt = system_prompt or self.default_system_prompt

    def run(self, task: str, session_id: str | None = None, close_session: bool = True) -> Trace:
        session_id = session_id or uuid.uuid4().hex
        trace = Trace(task, self.kind, self.llm.name, session_id)
        start = time.monotonic()
        messages = self.first_messages(task)
        try:
            for index in range(self.max_steps):
                step = Step(index, None)
                trace.steps.append(step)
                if self.step(messages, step, trace):
                    trace.status = "answered"
                    break
            else:
                trace.status = "max_steps"
        except RuntimeError as err:  # the model endpoint failed after its retries
            trace.status, trace.error = "error", str(err)
        finally:
            if close_session:
                self.tools.close_session(session_id)
            trace.duration_s = time.monotonic() - start
        return trace

    def first_messages(self, task: str) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": task}]

    @abstractmethod
    def step(self, messages: list[dict], step: Step, trace: Trace) -> bool:
        """One model turn and the calls it asks for; True when the model gave its answer."""

    def chat(self, messages: list[dict], step: Step, trace: Trace, **kwargs):
        reply = self.llm.chat(messages, **kwargs)
        step.llm_s += reply.duration_s
        trace.prompt_tokens += reply.prompt_tokens
        trace.completion_tokens += reply.completion_tokens
        return reply

    def call_tools(self, session_id: str, calls: list[tuple[str, str, str]], step: Step) -> list[ToolResult]:
        """Run (id, name, arguments) calls in parallel and record them on the step."""
        start = time.monotonic()
        results = self.tools.call_many(session_id, [(name, arguments) for _, name, arguments in calls])
        step.tools_s = time.monotonic() - start
        step.tool_calls += [ToolCallRecord(i, name, arguments, result.to_dict())
                            for (i, name, arguments), result in zip(calls, results)]
        return results


class FunctionCallingAgent(Agent):
    kind = "function_calling"

    def __init__(self, llm, tools: ToolExecutor, max_steps: int = 6, system_prompt: str | None = None,
                 first_tool_choice: str = "auto"):
        super().__init__(llm, tools, max_steps, system_prompt)
        self.first_tool_choice = first_tool_choice

    def step(self, messages: list[dict], step: Step, trace: Trace) -> bool:
        choice = self.first_tool_choice if step.index == 0 else "auto"
        reply = self.chat(messages, step, trace, tools=self.tools.schemas(), tool_choice=choice)
        step.thought = reply.content
        messages.append(reply.message())
        if not reply.tool_calls:
            trace.answer = (reply.content or "").strip()
            return True
        calls = [(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}") for c in reply.tool_calls]
        for (call_id, _, _), result in zip(calls, self.call_tools(trace.session_id, calls, step)):
            messages.append({"role": "tool", "tool_call_id": call_id, "content": result.for_model()})
        return False


_ACTION = re.compile(r"Action\s*:\s*(?P<name>[\w.-]+)\s*\n+\s*Action\s*Input\s*:\s*(?P<input>.*)", re.DOTALL)
_FINAL = re.compile(r"Final\s*Answer\s*:\s*(?P<answer>.*)", re.DOTALL)
_THOUGHT = re.compile(r"^\s*(?:Thought\s*:)?\s*(?P<thought>.*?)\s*(?=Action\s*:|Final\s*Answer\s*:|$)", re.DOTALL)


class ReActAgent(Agent):
    kind = "react"
    default_system_prompt = ("Answer the question using the tools below. Use exactly this format:\n"
                             "Thought: what to do next\nAction: the tool's name\nAction Input: the arguments as a "
                             "JSON object\nObservation: the tool's result (written for you)\n... (repeat as needed)\n"
                             "Thought: I know the answer\nFinal Answer: the answer\n\nTools:\n{tools}")

    def first_messages(self, task: str) -> list[dict]:
        tools = "\n".join(f"- {s['function']['name']}: {s['function']['description']} "
                          f"Arguments: {json.dumps(s['function']['parameters'].get('properties', {}))}"
                          for s in self.tools.schemas())
        return [{"role": "system", "content": self.system_prompt.replace("{tools}", tools)},
                {"role": "user", "content": task}]

    def step(self, messages: list[dict], step: Step, trace: Trace) -> bool:
        text = self.chat(messages, step, trace, stop=["Observation:"]).content or ""
        messages.append({"role": "assistant", "content": text.strip()})
        step.thought = _THOUGHT.match(text).group("thought") or None
        action = _ACTION.search(text)
        final = _FINAL.search(text)
        if final and (not action or final.start() < action.start()):
            trace.answer = final.group("answer").strip()
            return True
        if not action:
            observation = ("Error: reply in the format `Action: <tool>` + `Action Input: <JSON>`, "
                           "or `Final Answer: <answer>`")
        else:
            arguments = action.group("input").strip().removeprefix("```json").strip("`").strip()
            call = (f"call_{uuid.uuid4().hex[:24]}", action.group("name"), arguments)
            observation = self.call_tools(trace.session_id, [call], step)[0].for_model()
        messages.append({"role": "user", "content": f"Observation: {observation}"})
        return False


def make_agent(config, llm, tools: ToolExecutor) -> Agent:
    """An agent from an `AgentSection`."""
    if config.kind == "react":
        return ReActAgent(llm, tools, config.max_steps, config.system_prompt)
    return FunctionCallingAgent(llm, tools, config.max_steps, config.system_prompt, config.first_tool_choice)
