"""Batch mode: run an agent over a JSONL of tasks in parallel, and write traces and a summary.

`ray job submit ... jobs/agent.py CONFIG` and `internray agent CONFIG` both land here. Tasks run
on a pool of `AgentRunner` actors (each holds one model client; a local HF model is loaded once
per actor, not per task) against one shared tool pool. Each task's trace is written as soon as
it finishes, so a rerun of the same config resumes with the tasks that have no trace yet.
Unusable task lines are counted and written to `skipped.jsonl` with the reason.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import ray
from ray.util.metrics import Gauge

from internray.agent.agents import Trace, make_agent
from internray.agent.config import AgentConfig
from internray.agent.executor import ToolExecutor
from internray.agent.llm import make_llm
from internray.runs import Run, open_run, write_json, write_jsonl

_MAX_TASK_FILE_BYTES = 20 * 2**20


@ray.remote
class AgentRunner:
    def __init__(self, config: dict, tools: ToolExecutor):
        self.config = AgentConfig.model_validate(config)
        self.agent = make_agent(self.config.agent, make_llm(self.config.llm), tools)

    def run(self, task: dict, session_id: str) -> dict:
        return self.agent.run(task["task"], session_id).to_dict()


def read_tasks(path: Path) -> tuple[list[dict], list[dict]]:
    """(tasks, skipped): each task {id, task, expected?, files: {name: bytes}}; skipped lines keep
    their line number, text and the reason."""
    tasks, skipped, seen = [], [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            task = _task(json.loads(line), number, path.parent)
            if task["id"] in seen:
                raise ValueError(f"duplicate id {task['id']!r}")
        except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
            skipped.append({"line": number, "text": line[:500], "reason": str(err)})
            continue
        seen.add(task["id"])
        tasks.append(task)
    return tasks, skipped


def _task(record, number: int, base: Path) -> dict:
    if not isinstance(record, dict):
        raise ValueError("a task must be a JSON object")
    text = record.get("task", record.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError("missing `task` (the question, a non-empty string)")
    unknown = set(record) - {"id", "task", "prompt", "expected", "files"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (known: id, task, expected, files)")
    files = {}
    for name in record.get("files") or []:
        file = base / name
        if file.stat().st_size > _MAX_TASK_FILE_BYTES:
            raise ValueError(f"file {name} is larger than {_MAX_TASK_FILE_BYTES // 2**20} MB")
        files[file.name] = file.read_bytes()
    expected = record.get("expected")
    return {"id": str(record.get("id", f"line-{number}")), "task": text,
            "expected": None if expected is None else str(expected), "files": files}


def check_answer(answer: str | None, expected: str | None) -> bool | None:
    """None without an expectation; numbers compare as numbers (`1,024.0` is 1024), text by
    case-insensitive containment."""
    if expected is None:
        return None
    if not answer:
        return False
    target = _number(expected)
    if target is not None:
        found = [_number(m) for m in re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?", answer)]
        return any(n is not None and math.isclose(n, target, rel_tol=1e-6, abs_tol=1e-9) for n in found)
    return " ".join(expected.casefold().split()) in " ".join(answer.casefold().split())


def _number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def run_agent(config: AgentConfig) -> Run:
    if config.tasks is None:
        raise ValueError("agent batch mode needs `tasks` (a JSONL file of {id, task, expected?, files?})")
    run = open_run("agent", config, config.run.root, config.run.resume)
    run.add_input(config.tasks, role="tasks")
    print(f"[agent] {'resumed' if run.resumed else 'started'} in {run.dir}", flush=True)
    tasks, skipped = read_tasks(config.tasks)
    if skipped:
        write_jsonl(run.path("skipped.jsonl"), skipped)
        print(f"[agent] {len(skipped)} unusable task lines skipped, see {run.path('skipped.jsonl')}", flush=True)
    tools = ToolExecutor(config.tools, config.executor)
    tools.schemas()  # the pool is up (and its tools import) before any model is called
    todo = [t for t in tasks if not _trace_path(run, t["id"]).is_file()]
    _run_tasks(run, config, tools, todo, total=len(tasks))
    tools.shutdown()
    summary = summarize(run, tasks, len(skipped))
    run.update(counts={"tasks": len(tasks), "skipped": len(skipped)}, metrics=summary)
    Gauge("internray_agent_success_rate", "share of tasks answered correctly", tag_keys=("run",)).set(
        summary["success_rate"] or 0.0, tags={"run": run.run_id})
    run.finish()
    print("[agent] " + json.dumps(summary), flush=True)
    return run


def _run_tasks(run: Run, config: AgentConfig, tools: ToolExecutor, tasks: list[dict], total: int) -> None:
    from tqdm.auto import tqdm

    cpus = 1.0 if config.llm.kind == "hf" else 0.1  # a remote model only waits on HTTP
    runners = [AgentRunner.options(num_cpus=cpus).remote(config.model_dump(mode="json"), tools)
               for _ in range(min(config.concurrency, max(1, len(tasks))))]
    progress = tqdm(total=total, initial=total - len(tasks), desc=f"agent {run.run_id}", unit="task")
    done_gauge = Gauge("internray_agent_tasks_done", "agent tasks finished in this run", tag_keys=("run",))
    queue, idle, inflight = list(tasks), list(runners), {}
    while queue or inflight:
        while idle and queue:
            task, runner = queue.pop(0), idle.pop()
            session = f"{run.run_id}-{task['id']}"
            if task["files"]:
                tools.add_files(session, task["files"])
            inflight[runner.run.remote(task, session)] = (runner, task)
        ready, _ = ray.wait(list(inflight), num_returns=1)
        runner, task = inflight.pop(ready[0])
        idle.append(runner)
        try:
            trace = ray.get(ready[0])
        except ray.exceptions.RayError as err:  # the runner died: record it, the others go on
            trace = Trace(task["task"], config.agent.kind, config.llm.name or config.llm.path_or_url, "",
                          status="error", error=f"{type(err).__name__}: {err}").to_dict()
        _save_trace(run, task, trace)
        progress.update(1)
        done_gauge.set(progress.n, tags={"run": run.run_id})
    progress.close()
    for runner in runners:
        ray.kill(runner)


def _trace_path(run: Run, task_id: str) -> Path:
    return run.path("traces", re.sub(r"[^\w.-]", "_", task_id) + ".json")


def _save_trace(run: Run, task: dict, trace: dict) -> None:
    record = {"id": task["id"], "expected": task["expected"],
              "correct": check_answer(trace["answer"], task["expected"])} | trace
    write_json(_trace_path(run, task["id"]), record)


def summarize(run: Run, tasks: list[dict], skipped: int) -> dict:
    """The summary over every task's trace (this attempt's and earlier ones'), also written to
    results.jsonl (one line per task) and summary.json."""
    records = [json.loads(_trace_path(run, t["id"]).read_text()) for t in tasks]
    rows = [{"id": r["id"], "status": r["status"], "answer": r["answer"], "expected": r["expected"],
             "correct": r["correct"], "steps": len(r["steps"]),
             "tool_calls": sum(len(s["tool_calls"]) for s in r["steps"]), "duration_s": round(r["duration_s"], 3)}
            for r in records]
    write_jsonl(run.path("results.jsonl"), rows)
    calls = [c for r in records for s in r["steps"] for c in s["tool_calls"]]
    judged = [r for r in rows if r["correct"] is not None]
    summary = {
        "tasks": len(rows), "skipped": skipped,
        "answered": sum(r["status"] == "answered" for r in rows),
        "max_steps": sum(r["status"] == "max_steps" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "correct": sum(bool(r["correct"]) for r in judged),
        "success_rate": round(sum(bool(r["correct"]) for r in judged) / len(judged), 4) if judged else None,
        "mean_steps": round(sum(r["steps"] for r in rows) / len(rows), 3) if rows else 0,
        "tool_calls": dict(Counter(c["name"] for c in calls)),
        "tool_errors": sum(not c["result"]["ok"] for c in calls),
    }
    write_json(run.path("summary.json"), summary)
    return summary
