"""The agent stage's own logic: tool schemas, the calculator, the agents' loops, batch mode.

The model is `ScriptedLLM`, a test double that replays fixed replies and records what it was
sent: these tests are about the agents' handling of calls, errors and limits, not about a model.
Tools run for real on the Ray actor pool.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from internray.agent.agents import FunctionCallingAgent, ReActAgent
from internray.agent.config import AgentConfig, ExecutorSection, ToolsSection
from internray.agent.llm import Reply
from internray.agent.tools import ToolContext, function_tool
from internray.agent.tools.calculator import Calculator
from internray.config import ConfigError, validate_config


class ScriptedLLM:
    """Test double for a chat model: returns `replies` in order, keeps every request."""

    name = "scripted"

    def __init__(self, replies: list[Reply]):
        self.replies, self.requests = list(replies), []

    def chat(self, messages, tools=None, tool_choice=None, stop=None) -> Reply:
        self.requests.append({"messages": json.loads(json.dumps(messages)), "tools": tools,
                              "tool_choice": tool_choice, "stop": stop})
        return self.replies.pop(0)


def call(name: str, arguments: dict | str, call_id: str = "") -> dict:
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id or f"call_{name}_{abs(hash(arguments)) % 10**6}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def calculator_pool(ray_cluster):
    from internray.agent.executor import ToolExecutor

    pool = ToolExecutor(ToolsSection(enabled=["calculator", "tests.test_agent:slow_echo"]),
                        ExecutorSection(num_workers=2, cpus_per_worker=0, call_timeout_s=20))
    yield pool
    pool.shutdown()


@function_tool
def slow_echo(text: str, seconds: float = 0.0) -> str:
    """Echo text back after a pause.

    Args:
        text: what to echo
        seconds: how long to wait first
    """
    import time

    time.sleep(seconds)
    return text


def test_tool_schema_comes_from_the_typed_signature_and_docstring():
    schema = slow_echo.schema()["function"]
    assert schema["name"] == "slow_echo" and schema["description"] == "Echo text back after a pause."
    assert schema["parameters"]["required"] == ["text"]
    assert schema["parameters"]["properties"]["seconds"] == {"default": 0.0, "description": "how long to wait first",
                                                             "type": "number"}
    bad = slow_echo.call(ToolContext("s", Path(".")), {"text": 3, "speed": 1})
    assert not bad.ok and "`text`" in bad.content and "`speed`: unknown argument" in bad.content


@pytest.mark.parametrize("expression, answer", [
    ("0.1 + 0.2", "0.3"), ("1/3 * 3", "1"), ("(17 + 5) * 3 / 4", "16.5"), ("2^10", "1024"),
    ("123456789 * 987654321", "121932631112635269"), ("1/3", "0.3333333333333333333333333333 (= 1/3)"),
    ("sqrt(144)", "12"), ("-7 // 2", "-4")])
def test_calculator_is_exact(expression, answer):
    assert Calculator().call(ToolContext("s", Path(".")), {"expression": expression}).content == answer


@pytest.mark.parametrize("expression, problem", [
    ("__import__('os').system('id')", "a call to \"__import__('os').system\""), ("x + 1", "the name 'x'"),
    ("9 ** 9 ** 9", "too large"), ("1 / 0", "division by zero"), ("2 +", "not an arithmetic expression"),
    ("'a' * 3", "found Constant")])
def test_calculator_refuses_what_is_not_arithmetic(expression, problem):
    result = Calculator().call(ToolContext("s", Path(".")), {"expression": expression})
    assert not result.ok and problem in result.content


def test_react_agent_runs_several_steps_until_a_final_answer(calculator_pool):
    llm = ScriptedLLM([
        Reply("Thought: first the product\nAction: calculator\nAction Input: {\"expression\": \"12 * 34\"}"),
        Reply("Thought: now add\nAction: calculator\nAction Input: {\"expression\": \"408 + 1\"}\n"),
        Reply("Thought: I know the answer\nFinal Answer: 409"),
    ])
    trace = ReActAgent(llm, calculator_pool, max_steps=5).run("What is 12*34+1?")
    assert trace.status == "answered" and trace.answer == "409"
    assert [(c.name, c.result["content"]) for c in trace.tool_calls] == [("calculator", "408"), ("calculator", "409")]
    assert trace.steps[0].thought == "first the product"
    assert llm.requests[0]["stop"] == ["Observation:"]
    assert llm.requests[1]["messages"][-1] == {"role": "user", "content": "Observation: 408"}
    assert "calculator" in llm.requests[0]["messages"][0]["content"]  # the tools are described to the model


def test_react_agent_tells_the_model_when_its_reply_has_no_action():
    llm = ScriptedLLM([Reply("I think it is about 400."), Reply("Final Answer: 408")])
    trace = ReActAgent(llm, tools=_NoTools(), max_steps=3).run("12*34?")
    assert trace.answer == "408" and len(trace.steps) == 2
    assert "Final Answer" in llm.requests[1]["messages"][-1]["content"]


def test_function_calling_agent_runs_parallel_calls_concurrently(calculator_pool):
    llm = ScriptedLLM([
        Reply(None, [call("slow_echo", {"text": "a", "seconds": 1.5}, "c1"),
                     call("slow_echo", {"text": "b", "seconds": 1.5}, "c2"),
                     call("calculator", {"expression": "6*7"}, "c3")]),
        Reply("a, b and 42"),
    ])
    trace = FunctionCallingAgent(llm, calculator_pool, max_steps=3).run("go")
    assert trace.status == "answered" and trace.answer == "a, b and 42"
    tool_messages = [m for m in llm.requests[1]["messages"] if m["role"] == "tool"]
    assert [(m["tool_call_id"], m["content"]) for m in tool_messages] == [("c1", "a"), ("c2", "b"), ("c3", "42")]
    assert trace.steps[0].tools_s < 2.8  # the two 1.5 s calls overlapped
    assert llm.requests[0]["tools"] == calculator_pool.schemas() and llm.requests[0]["tool_choice"] == "auto"


def test_function_calling_agent_feeds_tool_errors_back_and_recovers(calculator_pool):
    llm = ScriptedLLM([
        Reply(None, [call("calculator", {"expression": "12 x 34"}, "bad")]),
        Reply(None, [call("calculator", "{not json", "worse")]),
        Reply(None, [call("calculator", {"expression": "12 * 34"}, "good")]),
        Reply("408"),
    ])
    trace = FunctionCallingAgent(llm, calculator_pool, max_steps=5).run("12 times 34?")
    assert trace.status == "answered" and trace.answer == "408"
    results = [c.result for c in trace.tool_calls]
    assert [r["ok"] for r in results] == [False, False, True]
    first_error = llm.requests[1]["messages"][-1]
    assert first_error["role"] == "tool" and first_error["content"].startswith("Error: not an arithmetic expression")
    assert "not valid JSON" in llm.requests[2]["messages"][-1]["content"]


def test_agents_stop_at_the_step_limit(calculator_pool):
    loop = [Reply(None, [call("calculator", {"expression": f"{i} + 1"})]) for i in range(10)]
    llm = ScriptedLLM(loop)
    trace = FunctionCallingAgent(llm, calculator_pool, max_steps=3, first_tool_choice="required").run("count")
    assert trace.status == "max_steps" and trace.answer is None
    assert len(trace.steps) == 3 and len(llm.requests) == 3
    assert [r["tool_choice"] for r in llm.requests] == ["required", "auto", "auto"]


def test_a_call_to_an_unknown_tool_is_an_error_the_model_reads(calculator_pool):
    result = calculator_pool.call("s1", "rm_rf", {"path": "/"})
    assert not result.ok and "no tool named 'rm_rf'" in result.content and "calculator" in result.content


def test_trace_is_saved_as_json_with_calls_results_and_timings(calculator_pool, tmp_path):
    llm = ScriptedLLM([Reply("Let me compute.", [call("calculator", {"expression": "2**5"})]), Reply("32")])
    trace = FunctionCallingAgent(llm, calculator_pool).run("2^5?")
    saved = json.loads(trace.save(tmp_path / "trace.json").read_text())
    step = saved["steps"][0]
    assert saved["answer"] == "32" and saved["model"] == "scripted" and saved["agent"] == "function_calling"
    assert step["thought"] == "Let me compute." and step["tool_calls"][0]["name"] == "calculator"
    assert step["tool_calls"][0]["result"]["content"] == "32" and step["tools_s"] > 0
    assert saved["duration_s"] >= step["tools_s"]


def test_config_rejects_unknown_tools_and_keys():
    with pytest.raises(ConfigError, match="unknown tool 'calculater'"):
        validate_config(AgentConfig, {"llm": {"path_or_url": "http://x"}, "tools": {"enabled": ["calculater"]}})
    with pytest.raises(ConfigError, match="search.corpus is not set"):
        validate_config(AgentConfig, {"llm": {"path_or_url": "http://x"}, "tools": {"enabled": ["search"]}})
    with pytest.raises(ConfigError, match="unknown key `agent.max_step`"):
        validate_config(AgentConfig, {"llm": {"path_or_url": "http://x"}, "agent": {"max_step": 3}})


class _NoTools:
    """A tool pool with no tools, for agent logic that never calls one."""

    def schemas(self):
        return []

    def close_session(self, session_id):
        pass


def test_a_killed_tool_worker_is_reported_restarted_and_serves_again(ray_cluster):
    import threading

    import ray

    from internray.agent.executor import ToolExecutor

    pool = ToolExecutor(ToolsSection(enabled=["calculator", "tests.test_agent:slow_echo"]),
                        ExecutorSection(num_workers=1, cpus_per_worker=0, call_timeout_s=60))
    try:
        assert pool.call("s", "calculator", {"expression": "1+1"}).content == "2"
        threading.Timer(1.0, lambda: ray.kill(pool.worker("s"), no_restart=False)).start()
        died = pool.call("s", "slow_echo", {"text": "never", "seconds": 30})
        assert not died.ok and "worker died" in died.content and "state is lost" in died.content
        assert pool.call("s", "calculator", {"expression": "2+2"}).content == "4"  # restarted, serving
    finally:
        pool.shutdown()
