"""The `internray` command: one subcommand per stage, plus `doctor` and `demo`.

Stage subcommands take a config file and dotted overrides (`internray data cfg.yaml
pack.seq_len=1024`) and call the same library function as the `jobs/` entrypoints, so a laptop
run and a `ray job submit` run differ only in where Ray is.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

from internray import __version__
from internray.config import ConfigError, load_config

# stage name -> (help, config class path, run function path)
STAGES = {
    "data": ("ingest, clean, dedup, decontaminate, tokenize and pack a corpus (Ray Data)",
             "internray.data.config:DataConfig", "internray.data.pipeline:run_data"),
    "pretrain": ("pretrain a causal LM on packed shards (Ray Train + DeepSpeed)",
                 "internray.train.config:TrainConfig", "internray.train.pretrain:run_pretrain"),
    "finetune": ("SFT (full, LoRA, QLoRA) or incremental pretraining of a checkpoint",
                 "internray.train.config:TrainConfig", "internray.train.finetune:run_finetune"),
    "align": ("reward model, DPO, SimPO, GRPO or PPO training of a checkpoint (Ray Train + DeepSpeed, engine rollouts)",
              "internray.align.config:AlignConfig", "internray.align.run:run_align"),
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "doctor":
            return doctor(args.address)
        if args.command == "chat":
            from internray.train.chat import chat

            chat(args.model_dir, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            return 0
        if args.command == "plan":
            return plan_command(args)
        if args.command == "serve":
            return serve_command(args)
        if args.command == "eval":
            return eval_command(args)
        if args.command == "agent":
            return agent_command(args)
        if args.command == "quantize":
            return quantize_command(args)
        if args.command == "leaderboard":
            from internray.eval.report import leaderboard

            for kind, path in leaderboard(Path(args.root)).items():
                print(f"{kind}: {path}")
            return 0
        if args.command == "demo":
            _connect(args.address)
            from internray.demo import run_demo

            run_demo(Path(args.root))
            return 0
        return run_stage(args.command, args.config, args.overrides, args.address)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_stage(stage: str, config_path: str, overrides: list[str], address: str | None = None):
    """Validate the config completely, then connect to Ray and run the stage."""
    _, config_cls, run_fn = STAGES[stage]
    config = load_config(_load(config_cls), config_path, overrides)
    _connect(address)
    _load(run_fn)(config)
    return 0


def plan_command(args) -> int:
    """Print the layout `internray.train.plan` chooses; exit 1 when nothing fits."""
    from internray.models.presets import PRESETS
    from internray.train.plan import plan

    if args.model not in PRESETS and not Path(args.model).is_dir():
        raise ConfigError(f"plan: {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    if args.model in PRESETS:
        model = args.model
    else:
        from transformers import AutoConfig

        model = AutoConfig.from_pretrained(args.model)
    try:
        result = plan(model, gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb, seq_len=args.seq_len,
                      global_batch_tokens=args.global_batch_tokens, gpus_per_node=args.gpus_per_node,
                      method=args.method, cpu_memory_gb=args.cpu_memory_gb)
    except ValueError as err:
        raise ConfigError(f"plan: {err}") from None
    print(result.render())
    return 0 if result.fits else 1


def serve_command(args) -> int:
    """Validate everything first (config, model directories), then start Ray and the app."""
    import yaml

    from internray.serve.launch import serve_config, serve_forever

    if not args.model_dir and not args.config:
        raise ConfigError("serve: give a MODEL_DIR or --config serve.yaml")
    config_dict = yaml.safe_load(Path(args.config).read_text()) if args.config else None
    config = serve_config(args.model_dir, config_dict, tensor_parallel_size=args.tp, kv_cache_gib=args.kv_cache_gib,
                          kv_cache_dtype=args.kv_cache_dtype, served_name=args.served_name,
                          max_model_len=args.max_model_len, dtype=args.dtype, device=args.device, host=args.host,
                          port=args.port, api_keys=args.api_key, max_replicas=args.max_replicas)
    for model in config.models:
        if not Path(model.model, "config.json").is_file():
            raise FileNotFoundError(f"serve: {model.model} is not an HF checkpoint directory (no config.json)")
    from internray.runtime import SERVING_CLUSTER_ENV

    _connect(args.address, env=SERVING_CLUSTER_ENV)
    serve_forever(config)
    return 0


def eval_command(args) -> int:
    """OpenCompass-style flags on top of an optional config file; flags become dotted overrides."""
    from internray.eval.config import EvalConfig
    from internray.eval.runner import run_eval

    config = _load_with_flags(EvalConfig, args, {
        "model.path_or_url": args.model, "num_workers": args.num_workers, "limit": args.limit,
        "model.backend": args.backend, "run.root": args.root, "run.resume": args.resume}, {"datasets": args.datasets})
    _connect(args.address)
    run_eval(config)
    return 0


def agent_command(args) -> int:
    """One task (`--task`, answer and trace printed) or a batch (`tasks` in the config or `--tasks`)."""
    from internray.agent.config import AgentConfig

    config = _load_with_flags(AgentConfig, args, {
        "llm.path_or_url": args.model, "agent.kind": args.kind, "agent.max_steps": args.max_steps,
        "tasks": args.tasks, "run.root": args.root}, {"tools.enabled": args.tools})
    if args.task is None and config.tasks is None:
        raise ConfigError("agent: give --task TEXT, or a tasks JSONL (`tasks` in the config, or --tasks)")
    _connect(args.address)
    if args.task is None:
        from internray.agent.runner import run_agent

        run_agent(config)
        return 0
    from internray.agent.agents import make_agent
    from internray.agent.executor import ToolExecutor
    from internray.agent.llm import make_llm

    tools = ToolExecutor(config.tools, config.executor)
    try:
        trace = make_agent(config.agent, make_llm(config.llm), tools).run(args.task)
    finally:
        tools.shutdown()
    for step in trace.steps:
        print(f"[step {step.index}] {step.thought or ''}".rstrip())
        for call in step.tool_calls:
            print(f"  -> {call.name}({call.arguments[:200]}) = {json.dumps(call.result['content'][:300])}"
                  + ("" if call.result["ok"] else " [error]"))
    path = trace.save(Path(config.run.root, "agent-traces", f"{trace.session_id}.json"))
    print(f"answer ({trace.status}): {trace.answer}\ntrace: {path}")
    return 0 if trace.status == "answered" else 1


def quantize_command(args) -> int:
    """`internray quantize MODEL_DIR --method awq-int4 --calib runs/data-...`, like `lmdeploy lite auto_awq`."""
    from internray.quant.config import QuantConfig
    from internray.quant.quantize import run_quantize

    overrides = [f"model={args.model_dir}", f"method={args.method}", *args.overrides]
    flags = {"calibration.data": args.calib, "group_size": args.group_size, "out": args.out, "run.root": args.root}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    config = load_config(QuantConfig, args.config, overrides)
    run_quantize(config)
    return 0


def _load_with_flags(cls, args, flags: dict, list_flags: dict):
    """An optional config file, its dotted overrides, then the flags given (as overrides too;
    `list_flags` are comma-separated lists). A first positional with `=` that is not a file is an
    override, so the config file is optional."""
    config_path, overrides = args.config, list(args.overrides)
    if config_path and "=" in config_path and not Path(config_path).is_file():
        config_path, overrides = None, [config_path, *overrides]
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    overrides += [f"{key}={json.dumps(value.split(','))}" for key, value in list_flags.items() if value]
    return load_config(cls, config_path, overrides)


def doctor(address: str | None) -> int:
    """Versions, devices, and whether a Ray cluster answers: the first thing to paste in a bug report."""
    import ray
    import torch

    rows = [("internray", __version__), ("python", platform.python_version()), ("ray", ray.__version__),
            ("torch", torch.__version__)]
    for name in ("deepspeed", "transformers", "peft", "datasets", "pyarrow"):
        try:
            rows.append((name, importlib.import_module(name).__version__))
        except Exception as err:  # a broken optional import must not hide the rest of the report
            rows.append((name, f"unavailable ({type(err).__name__}: {err})"))
    cuda = torch.cuda.is_available()
    rows.append(("devices", f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda
                 else f"CPU only ({torch.get_num_threads()} threads)"))
    for name, value in rows:
        print(f"{name:<14}{value}")
    target = address or os.environ.get("RAY_ADDRESS")
    if target is None:
        print(f"{'ray cluster':<14}none given (--address or RAY_ADDRESS); stages start an embedded one")
        return 0
    try:
        info = _connect(target)
        print(f"{'ray cluster':<14}reachable at {info['address']}, resources {info['resources']}")
        return 0
    except Exception as err:
        print(f"{'ray cluster':<14}NOT reachable at {target}: {type(err).__name__}: {err}")
        return 1


def _connect(address: str | None, **options) -> dict:
    from internray import runtime

    info = runtime.connect(address, **options)
    print(f"[internray] ray at {info['address']}, dashboard {info['dashboard'] or 'n/a'}", flush=True)
    return info


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internray", description="The InternLM full chain on Ray.")
    parser.add_argument("--version", action="version", version=f"internray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, (help_text, _, _) in STAGES.items():
        p = sub.add_parser(stage, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pack.seq_len=1024")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)")
    p = sub.add_parser("plan", help="choose ZeRO stage, offload and batch sizes for a model on N GPUs")
    p.add_argument("model", help="a preset (tiny, debug, 0.5b, 1.8b, 7b, 20b) or an HF model directory")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="per GPU, e.g. 80 for an A100-80GB")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch-tokens", type=int, default=4 * 2**20)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--cpu-memory-gb", type=float, help="host RAM per node; what is offloaded must fit in it")
    p = sub.add_parser("chat", help="talk to a checkpoint in the terminal (a quick check, not a server)")
    p.add_argument("model_dir", help="a Hugging Face checkpoint directory (e.g. a run's hf/)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p = sub.add_parser("serve", help="serve checkpoints over an OpenAI-compatible API (Ray Serve)")
    p.add_argument("model_dir", nargs="*", help="HF checkpoint directories (one model each)")
    p.add_argument("--config", help="a ServeConfig YAML (models: [...], server: {...}); flags override it")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks per replica")
    p.add_argument("--kv-cache-gib", type=float, help="KV-cache memory per rank (default 1)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"],
                   help="int8: quantized KV cache, ~2x the tokens of bf16")
    p.add_argument("--served-name", help="the model name clients send (default: the directory name)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--api-key", action="append", help="accept this Bearer key (repeatable); default: no auth")
    p.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas per model")
    p.add_argument("--address")
    p = sub.add_parser("eval", help="evaluate a checkpoint or an OpenAI-compatible endpoint on benchmarks (Ray actors)")
    p.add_argument("config", nargs="?", help="an EvalConfig YAML; the flags below override it")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. shard_size=64 model.batch_size=16")
    p.add_argument("--model", help="checkpoint directory or http(s) base URL of an OpenAI-compatible server")
    p.add_argument("--backend", choices=["auto", "hf", "openai"])
    p.add_argument("--datasets", help="comma-separated: mmlu, humaneval, needle, essays, or benchmark spec "
                                         "YAML files")
    p.add_argument("--num-workers", type=int, help="Ray actors running tasks in parallel")
    p.add_argument("--limit", type=int, help="first N items of each dataset")
    p.add_argument("--root", help="where runs are written (default: ./runs)")
    p.add_argument("--resume", nargs="?", const="auto", help="reopen the newest unfinished run with the same "
                                                              "config (default), or the run directory given")
    p.add_argument("--address")
    p = sub.add_parser("agent", help="run a tool-using agent on one task or a JSONL of tasks (tools on Ray actors)")
    p.add_argument("config", nargs="?", help="an AgentConfig YAML; the flags below override it")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. agent.max_steps=8 tools.python.timeout_s=30")
    p.add_argument("--model", help="http(s) base URL of an OpenAI-compatible server, or a checkpoint directory")
    p.add_argument("--task", help="one task: print the steps and the answer, save the trace")
    p.add_argument("--tasks", help="a JSONL of tasks {id, task, expected?, files?} (batch mode)")
    p.add_argument("--tools", help="comma-separated: calculator, python, data_analysis, search, http_get")
    p.add_argument("--kind", choices=["function_calling", "react"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--root", help="where runs and traces are written (default: ./runs)")
    p.add_argument("--address")
    p = sub.add_parser("quantize", help="int8 or AWQ int4 weight quantization of a checkpoint, for the serve engine")
    p.add_argument("model_dir", help="a dense HF checkpoint directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. calibration.samples=64 grid=10")
    p.add_argument("--method", choices=["int8", "awq-int4"], required=True)
    p.add_argument("--calib", help="awq-int4 calibration text: a data-stage run, or Parquet/JSONL with `text` "
                                   "(default: the Python standard library's sources)")
    p.add_argument("--group-size", type=int, help="awq-int4: input channels per scale (default 128)")
    p.add_argument("--out", help="output directory (default: the run directory's hf/)")
    p.add_argument("--config", help="a QuantConfig YAML; the flags override it")
    p.add_argument("--root", help="where the run is written (default: ./runs)")
    p = sub.add_parser("leaderboard", help="one table of the latest scores of every model across eval runs")
    p.add_argument("root", nargs="?", default="runs", help="the runs root (default: ./runs)")
    p = sub.add_parser("demo", help="run every stage end to end on real offline material")
    p.add_argument("--root", default="runs", help="where runs are written (default: ./runs)")
    p.add_argument("--address")
    p = sub.add_parser("doctor", help="print versions and devices, and check the Ray cluster")
    p.add_argument("--address")
    return parser


if __name__ == "__main__":
    sys.exit(main())
