"""Pretraining throughput: internray (Ray Train + DeepSpeed ZeRO-2) against a plain PyTorch loop.

Target (the project's): internray's tokens/s >= 0.9x a plain single-process PyTorch loop on the same
model, data and global batch, measured in the same run, with MFU for both; on a GPU, MFU >= 40% for
a ~0.5B InternLM3 preset in bf16.

Data: a byte-level BPE tokenizer (internray.data.tokenize.train_tokenizer) trained on the running
interpreter's standard-library sources, which are then packed (tokenize.pack) into full --seq-len
rows, one row per sequence the run consumes, in one Parquet shard: what a data run writes.

Both systems: same preset and seed, AdamW (torch's fused one, `optimizer_and_schedule`) + warmup/
cosine schedule, grad clipping, and global batch (W * --micro-batch sequences per step); the first
--warmup-steps are not timed.
- internray: `run_pretrain`, W workers, ZeRO-2, no validation, one checkpoint (the last step); on
  CPU --cpus-per-worker Ray CPUs and --threads-per-worker torch threads per worker, and gradients
  reduced through shared memory (train/cpu_collectives.py; --gloo for gloo's TCP loopback).
- plain: one process, one forward/backward over the whole global batch per step; on CPU
  W * threads-per-worker torch threads (as many as all workers together). bf16 = torch.autocast
  over fp32 weights, plain PyTorch's usual recipe (DeepSpeed's bf16 holds bf16 weights plus fp32
  master weights in the ZeRO optimizer). It runs before and after internray and the ratio is
  against the mean of the two: on a shared machine the rate drifts by 20% within minutes.
Columns: "tok/s step" = timed tokens / summed per-step times (internray's from its metrics.jsonl,
which exclude ray.train.report and its metric all-reduces); "tok/s wall" = timed tokens / wall time
from the end of the last warm-up step to the end of the last step (internray: when each step's line
appears in metrics.jsonl), every per-step overhead included; MFU = flops_per_token (6N + 12LdT) *
tok/s / peak, one peak for both: internray's `peak_flops` per worker (GPU: datasheet bf16; CPU: best
of 3 measured matmul rates at threads-per-worker threads), x W on CPU, passed to internray as
scaling.peak_flops_per_worker; "end-to-end" = internray from ray.init to run_pretrain's return
(Ray, DeepSpeed, checkpoint, HF export), plain from building the model to its last step.

Run:  .venv/bin/python benchmarks/train.py [--steps 20] [--json results.json]
GPU:  .venv/bin/python benchmarks/train.py --gpu --preset 0.5b --precision bf16 --seq-len 2048 --workers 1
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `internray` from this checkout
from internray.config import validate_config  # noqa: E402
from internray.data.tokenize import pack, train_tokenizer  # noqa: E402
from internray.models.presets import model_config, parameter_count  # noqa: E402
from internray.train.config import TrainConfig  # noqa: E402
from internray.train.engine import flops_per_token, optimizer_and_schedule, peak_flops  # noqa: E402
from internray.train.objective import build_model, collate  # noqa: E402

VOCAB_SIZE = 8192  # the data stage's default
TOKENIZER_CHARS = 3_000_000  # stdlib text the tokenizer is trained on


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="debug", help="internray.models.presets name")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (>= 1)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per worker per step")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="Ray CPUs per worker (CPU runs)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per worker (CPU runs)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--gloo", action="store_true", help="CPU: internray's collectives through gloo, not shared memory")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker; the plain loop on one GPU")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.warmup_steps < 1:
        p.error("--warmup-steps must be >= 1 (the wall-clock rate starts at the end of a warm-up step)")
    return args


def build_shards(root: Path, seq_len: int, rows_needed: int) -> Path:
    """Tokenizer + one packed shard of `rows_needed` full rows from stdlib sources; returns the shard dir."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.relative_to(stdlib).parts))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    texts = [t for t in texts if t.strip()]
    sizes = itertools.accumulate(len(t) for t in texts)
    sample = [t for t, before in zip(texts, itertools.chain([0], sizes)) if before < TOKENIZER_CHARS]
    train_tokenizer(sample, vocab_size=VOCAB_SIZE, min_frequency=2, out=root / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    docs, tokens = [], 0
    for text in texts:
        if tokens >= (rows_needed + 1) * seq_len:
            break
        docs.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        tokens += len(docs[-1])
    table = pack(docs, seq_len)
    table = table.filter(pc.equal(table["num_tokens"], seq_len))  # full rows only
    if len(table) < rows_needed:
        sys.exit(f"only {len(table)} rows of {seq_len} tokens from the stdlib; {rows_needed} needed")
    (root / "train").mkdir()
    pq.write_table(table.slice(0, rows_needed), root / "train" / "part-0.parquet")
    return root / "train"


def make_config(args, shards: Path, run_root: Path, peak: float | None = None) -> TrainConfig:
    total = args.warmup_steps + args.steps
    return validate_config(TrainConfig, {
        "run": {"root": str(run_root), "resume": "never"},
        "model": {"preset": args.preset, "max_position_embeddings": max(4096, args.seq_len)},
        "data": {"train": str(shards)},
        "lr_scheduler": {"warmup_steps": args.warmup_steps},
        "training": {"steps": total, "micro_batch_size": args.micro_batch, "precision": args.precision},
        "scaling": {"num_workers": args.workers, "use_gpu": args.gpu, "zero_stage": args.zero_stage,
                    "cpus_per_worker": 1.0 if args.gpu else args.cpus_per_worker,
                    "threads_per_worker": args.threads_per_worker, "peak_flops_per_worker": peak,
                    "shared_memory_collectives": not args.gloo},
        "checkpoint": {"every_steps": total, "max_failures": 0},
    })


def rates(tokens: list[int], seconds: list[float], ends: list[float], warmup: int, per_token: float, peak: float) -> dict:
    """tok/s over the timed steps from per-step seconds, and from step-end timestamps (wall)."""
    timed = sum(tokens[warmup:])
    step_rate = timed / sum(seconds[warmup:])
    wall_rate = timed / (ends[-1] - ends[warmup - 1])
    return {"timed_tokens": timed, "tokens_per_s": step_rate, "tokens_per_s_wall": wall_rate,
            "mfu": per_token * step_rate / peak, "mfu_wall": per_token * wall_rate / peak,
            "step_seconds": seconds, "step_gaps": [b - a for a, b in zip(ends, ends[1:])]}


def run_plain(config: TrainConfig, args, vocab_size: int, pad_id: int, per_token: float, peak: float) -> dict:
    device = torch.device("cuda" if args.gpu else "cpu")
    if not args.gpu:
        torch.set_num_threads(args.workers * args.threads_per_worker)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    started = time.perf_counter()
    torch.manual_seed(config.training.seed)
    model = build_model(config, vocab_size).to(device)
    optimizer, schedule = optimizer_and_schedule(model, config)
    rows = pq.read_table(config.data.train, columns=["input_ids"])
    batch = args.workers * args.micro_batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    tokens, seconds, ends, losses = [], [], [], []
    for step in range(config.training.steps):
        sync()
        t0 = time.perf_counter()
        input_ids, labels = collate(rows.slice((step * batch) % (len(rows) - batch + 1), batch), pad_id)
        input_ids, labels = input_ids.to(device), labels.to(device)
        with autocast:
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes on GPU
        ends.append(time.perf_counter())
        seconds.append(ends[-1] - t0)
        tokens.append(int((labels != -100).sum()))
    result = rates(tokens, seconds, ends, args.warmup_steps, per_token, peak * (1 if args.gpu else args.workers))
    return result | {"end_to_end_s": time.perf_counter() - started, "first_loss": losses[0], "last_loss": losses[-1]}


def watch_metrics(run_root: Path, arrivals: dict[int, float], stop: threading.Event) -> None:
    """Record when each step's line appears in the run's metrics.jsonl (the step's wall-clock end),
    reading only the new bytes every 20 ms: the watcher shares the CPUs with the run it times."""
    path, pending, offset = None, "", 0
    while not stop.is_set():
        time.sleep(0.02)
        path = path or next(run_root.glob("pretrain-*/metrics.jsonl"), None)
        if path is None:
            continue
        with path.open() as f:
            f.seek(offset)
            pending += f.read()
            offset = f.tell()
        now = time.perf_counter()
        *lines, pending = pending.split("\n")
        for line in lines:
            arrivals.setdefault(json.loads(line)["step"], now)


def run_internray(config: TrainConfig, args, per_token: float, peak: float) -> dict:
    import ray

    from internray import runtime
    from internray.train.pretrain import read_metrics, run_pretrain

    arrivals: dict[int, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_metrics, args=(Path(config.run.root), arrivals, stop), daemon=True)
    started = time.perf_counter()
    runtime.connect(num_cpus=None)  # all of this machine's CPUs (Ray reads the container's limit)
    ray.data.DataContext.get_current().enable_progress_bars = False
    watcher.start()
    try:
        run = run_pretrain(config)
    finally:
        stop.set()
        watcher.join()
    end_to_end = time.perf_counter() - started
    runtime.shutdown()
    history = read_metrics(run.path("metrics.jsonl"))
    tokens = [h["tokens_seen"] - (history[i - 1]["tokens_seen"] if i else 0) for i, h in enumerate(history)]
    seconds = [t / h["tokens_per_s"] for t, h in zip(tokens, history)]
    ends = [arrivals[h["step"]] for h in history]
    reported_mfu = sum(h["mfu"] * s for h, s in zip(history[args.warmup_steps:], seconds[args.warmup_steps:]))
    result = rates(tokens, seconds, ends, args.warmup_steps, per_token, peak * args.workers)
    return result | {"end_to_end_s": end_to_end, "reported_mfu": reported_mfu / sum(seconds[args.warmup_steps:]),
                     "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"]}


def main() -> None:
    args = parse_args()
    total = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        shards = build_shards(tmp, args.seq_len, total * args.workers * args.micro_batch)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
        pad_id = tokenizer.pad_token_id

        # One peak for both systems: internray's own definition, at one worker's thread count.
        torch.set_num_threads(args.threads_per_worker)
        peak = max(peak_flops(make_config(args, shards, tmp / "runs")) for _ in range(3))
        config = make_config(args, shards, tmp / "runs", peak)
        shape = model_config(args.preset, vocab_size=len(tokenizer), max_position_embeddings=max(4096, args.seq_len))
        per_token = flops_per_token(shape, args.seq_len)
        results = {"plain": run_plain(config, args, len(tokenizer), pad_id, per_token, peak)}
        results["internray"] = run_internray(config, args, per_token, peak)
        results["plain again"] = run_plain(config, args, len(tokenizer), pad_id, per_token, peak)

    print(f"\nmodel: preset {args.preset}, {parameter_count(shape) / 1e6:.1f}M parameters, "
          f"vocab {len(tokenizer)}, {per_token / 1e6:.1f} MFLOP/token (6N + 12LdT)")
    print(f"run: {args.workers} x {args.micro_batch} x {args.seq_len} tokens per step, {args.precision}, "
          f"{args.warmup_steps} warm-up + {args.steps} timed steps, "
          + ("GPU" if args.gpu else f"CPU, {args.threads_per_worker} thread(s) per worker, plain loop "
             f"{args.workers * args.threads_per_worker} threads"))
    print(f"peak per worker: {peak / 1e9:,.1f} GFLOP/s ({'datasheet' if args.gpu else 'measured matmul'}); "
          f"plain-loop peak {peak * (1 if args.gpu else args.workers) / 1e9:,.1f} GFLOP/s\n")
    print(f"{'system':<12}{'tok/s step':>12}{'tok/s wall':>12}{'MFU step':>10}{'MFU wall':>10}{'end-to-end s':>14}"
          f"{'loss first->last':>20}")
    for name, r in results.items():
        print(f"{name:<12}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s_wall']:>12,.0f}{r['mfu']:>10.2%}{r['mfu_wall']:>10.2%}"
              f"{r['end_to_end_s']:>14.1f}{r['first_loss']:>11.3f} ->{r['last_loss']:>6.3f}")
    ours, before, after = results["internray"], results["plain"], results["plain again"]
    summary = {f"ratio_{kind}": ours[key] / ((before[key] + after[key]) / 2)
               for kind, key in (("step", "tokens_per_s"), ("wall", "tokens_per_s_wall"))}
    print(f"(internray MFU as its own metrics.jsonl reports it, timed steps: {ours['reported_mfu']:.2%})\n")
    print(f"internray / plain tokens/s (mean of the plain runs before and after): {summary['ratio_step']:.2f}x "
          f"per-step, {summary['ratio_wall']:.2f}x wall   (target >= 0.9x)")
    if args.gpu:
        print(f"internray MFU: {ours['mfu']:.1%}   (target >= 40%)")
    if args.json:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "peak_flops_per_worker": peak,
                  "systems": results, "summary": summary}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
