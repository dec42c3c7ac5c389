"""The agent stage end to end: SmolLM2-135M-Instruct served by internray, the function-calling
agent, tools on the Ray actor pool, batch mode with traces, a summary and resume."""
from __future__ import annotations

import json

import pytest

from internray.agent.config import AgentConfig
from internray.config import validate_config

pytestmark = pytest.mark.slow


def agent_config(server, tmp_path, **extra) -> AgentConfig:
    return validate_config(AgentConfig, {
        "llm": {"path_or_url": server.url, "name": server.model, "max_tokens": 64},
        "agent": {"kind": "function_calling", "max_steps": 3, "first_tool_choice": "required"},
        "tools": {"enabled": ["calculator"]},
        "executor": {"num_workers": 1, "cpus_per_worker": 0},
        "run": {"root": str(tmp_path / "runs")}, **extra})


def test_smollm2_answers_a_calculator_task_through_the_function_calling_agent(smollm2_server, tmp_path):
    from internray.agent.agents import make_agent
    from internray.agent.executor import ToolExecutor
    from internray.agent.llm import make_llm

    config = agent_config(smollm2_server, tmp_path)
    tools = ToolExecutor(config.tools, config.executor)
    try:
        trace = make_agent(config.agent, make_llm(config.llm), tools).run("What is 1234 * 5678?")
    finally:
        tools.shutdown()
    calls = trace.tool_calls
    assert calls and calls[0].name == "calculator" and calls[0].result["ok"]
    assert json.loads(calls[0].arguments)["expression"].replace(" ", "") == "1234*5678"
    assert calls[0].result["content"] == "7006652"
    assert trace.status == "answered" and "7006652" in trace.answer.replace(",", "")


def test_batch_mode_writes_traces_and_a_summary_skips_bad_lines_and_resumes(smollm2_server, tmp_path):
    from internray.agent.runner import run_agent

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join([
        json.dumps({"id": "mul", "task": "What is 1234 * 5678?", "expected": "7006652"}),
        "{not json",
        json.dumps({"id": "pow", "task": "What is 2 to the power of 20? Use 2**20.", "expected": "1048576"}),
        json.dumps({"id": "empty", "task": ""}),
    ]) + "\n")
    config = agent_config(smollm2_server, tmp_path, tasks=str(tasks), concurrency=2)
    run = run_agent(config)
    summary = json.loads(run.path("summary.json").read_text())
    assert summary["tasks"] == 2 and summary["skipped"] == 2 and summary["correct"] >= 1
    assert summary["tool_calls"].get("calculator", 0) >= 2  # first_tool_choice=required: each task calls
    skipped = [json.loads(line) for line in run.path("skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [2, 4] and "missing `task`" in skipped[1]["reason"]
    trace = json.loads(run.path("traces", "mul.json").read_text())
    assert trace["correct"] is True and trace["steps"][0]["tool_calls"][0]["name"] == "calculator"
    assert run.manifest["status"] == "complete" and run.manifest["metrics"]["success_rate"] >= 0.5

    # A rerun of the same config reopens nothing (the run is complete) but a crashed one resumes:
    # drop one trace, mark the run unfinished, and only that task runs again.
    run.path("traces", "pow.json").unlink()
    run.manifest["status"] = "running"
    run.save()
    kept = run.path("traces", "mul.json").stat().st_mtime_ns
    again = run_agent(config)
    assert again.dir == run.dir and run.path("traces", "pow.json").is_file()
    assert run.path("traces", "mul.json").stat().st_mtime_ns == kept


def test_the_local_hf_client_and_the_served_client_give_the_same_greedy_reply(smollm2_server, smollm2_dir):
    from internray.agent.config import LLMSection
    from internray.agent.llm import HFChat, OpenAIChat

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name three colors of the rainbow."}]
    local = HFChat(LLMSection(path_or_url=str(smollm2_dir), max_tokens=24)).chat(messages)
    served = OpenAIChat(LLMSection(path_or_url=smollm2_server.url, name=smollm2_server.model, max_tokens=24))
    remote = served.chat(messages)
    assert local.content and local.content == remote.content
    assert local.prompt_tokens == remote.prompt_tokens and local.completion_tokens == remote.completion_tokens
