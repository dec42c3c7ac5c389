"""The per-worker training loop, shared by pretraining, finetuning and alignment.

Ray Train starts one copy per worker inside a torch.distributed group (gloo on CPU, NCCL on
GPU); DeepSpeed wraps the model in that group. What is minimized comes from an `Objective`
(objective.py): language modelling, or a preference / RL loss. The loop is the nanoGPT loop with
three additions: it resumes from the latest checkpoint Ray Train hands back (skipping the batches
already seen, so a restarted run sees the same data), it records metrics every step (metrics.jsonl, Ray gauges), and every
`checkpoint.every_steps` all ranks save their DeepSpeed shards into one Ray Train checkpoint.
Step times are measured from the end of one step to the end of the next, so tokens/s and MFU
include data loading, communication, reporting and checkpointing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray.train
import torch
import torch.distributed as dist

from internray.train import cpu_collectives
from internray.train.config import TrainConfig
from internray.train.engine import deepspeed_config, flops_per_token, optimizer_and_schedule, peak_flops
from internray.train.objective import Objective, collate

CHECKPOINT_TAG = "ds"
REPORT_EVERY_S = 10.0
STATE_FILE = "train_state.json"


def train_loop_per_worker(config_dict: dict) -> None:
    import deepspeed

    objective: Objective = config_dict["objective"]
    config = objective.config
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config.training.seed)
    torch.set_num_threads(config.scaling.threads_per_worker)

    model = objective.build_model(config_dict["vocab_size"])
    if config.training.activation_checkpointing:
        model.gradient_checkpointing_enable()
    objective.prepare(model)
    optimizer, schedule = optimizer_and_schedule(model, config)
    shared_memory = (config.scaling.shared_memory_collectives and not config.scaling.use_gpu
                     and cpu_collectives.prepare(context.get_world_size(), context.get_local_world_size()))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(config))
    shared_memory = shared_memory and cpu_collectives.use_shared_memory_collectives()
    if rank == 0 and not config.scaling.use_gpu and context.get_world_size() > 1:
        print(f"[internray train] {context.get_world_size()} CPU workers reduce gradients through "
              f"{'shared memory (DeepSpeed shm kernel)' if shared_memory else 'gloo (TCP)'}", flush=True)
    step, tokens_seen = restore(engine)
    objective.start(engine, step)
    batches = objective.batches(config_dict["pad_id"], skip=step * config.training.grad_accum_steps)
    per_token = flops_per_token(model.config, config_dict["seq_len"])
    peak = peak_flops(config)
    metrics_file = Path(config_dict["metrics_file"]) if rank == 0 else None

    gauges = TrainGauges(config_dict["run_id"]) if rank == 0 else None
    last_report = step_end = time.perf_counter()
    while step < config.training.steps:
        engine.train()
        losses, step_tokens, extras = [], 0, []
        for _ in range(config.training.grad_accum_steps):
            out = objective.loss(engine, next(batches))
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.detach().float())
            step_tokens += out.tokens
            extras.append(out.metrics)
        step += 1
        extra = {k: sum(e[k] for e in extras) / len(extras) for k in extras[0]}
        extra |= objective.after_step(engine, step)
        due = time.perf_counter() - last_report >= REPORT_EVERY_S
        mean_loss, global_tokens, report_due, extra = _across_ranks(torch.stack(losses).mean(), step_tokens, due, extra)
        now = time.perf_counter()
        seconds, step_end = now - step_end, now  # wall time since the last step ended: every overhead counts
        tokens_seen += global_tokens
        metrics = {
            "step": step,
            "loss": mean_loss,
            "lr": schedule.get_last_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": global_tokens / seconds,
            "mfu": per_token * global_tokens / seconds / (peak * context.get_world_size()),
            "tokens_seen": tokens_seen,
            "memory_gb": memory_gb(),
            "step_s": seconds,
        } | extra
        if config.data.validation is not None and (step % config.validation.every_steps == 0 or step == config.training.steps):
            metrics["val_loss"] = validation_loss(engine, config, config_dict["pad_id"])
        if metrics_file is not None:
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            gauges.set(metrics)
        if step % config.checkpoint.every_steps == 0 or step == config.training.steps:
            save_and_report(engine, metrics, step, tokens_seen, rank)
            last_report = time.perf_counter()
        elif report_due:  # decided together: ray.train.report is a barrier every rank must reach
            ray.train.report(metrics)
            last_report = time.perf_counter()


class TrainGauges:
    """Per-step metrics into Ray's metrics pipeline (the dashboard's Metrics view), from rank 0,
    one gauge `internray_train_<name>` per metric (the objective's own ones included).

    Ray Train's own `report` blocks until its controller collects it (it polls every ~2 s), so
    the loop reports to Ray Train only every REPORT_EVERY_S and at checkpoints; these gauges
    carry every step without waiting.
    """

    def __init__(self, run_id: str):
        self.tags = {"run": run_id}
        self.gauges = {}

    def set(self, metrics: dict) -> None:
        from ray.util.metrics import Gauge

        for name, value in metrics.items():
            if name == "step":
                continue
            if name not in self.gauges:
                self.gauges[name] = Gauge(f"internray_train_{name}", f"train {name}", tag_keys=("run",))
            self.gauges[name].set(float(value), tags=self.tags)


@torch.no_grad()
def validation_loss(engine, config: TrainConfig, pad_id: int) -> float:
    """Mean loss on the first `validation.batches` micro-batches per rank, each rank its own rows.

    The validation shards are small and on shared storage, so every rank reads them directly
    (rank::world) instead of through a Ray Data split that would need equal consumption.
    """
    engine.eval()
    rows = pq.read_table(config.data.validation, columns=["input_ids"])
    size, rank, world = config.training.micro_batch_size, dist.get_rank(), dist.get_world_size()
    mine = rows.take(list(range(rank, len(rows), world)))
    losses = []
    for start in range(0, min(len(mine), size * config.validation.batches), size):
        input_ids, labels = collate(mine.slice(start, size), pad_id)
        losses.append(float(engine(input_ids=input_ids.to(engine.device), labels=labels.to(engine.device)).loss))
    return _mean_across_ranks(torch.tensor(sum(losses) / max(1, len(losses))))


def restore(engine) -> tuple[int, int]:
    """Load the latest Ray Train checkpoint into the engine; return (step, tokens seen)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    return state["step"], state["tokens_seen"]


def save_and_report(engine, metrics: dict, step: int, tokens_seen: int, rank: int) -> None:
    """All ranks write their ZeRO shards into one directory layout; Ray Train merges and keeps K."""
    directory = tempfile.mkdtemp(prefix=f"internray-ckpt-{step}-")
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
    if rank == 0:
        (Path(directory) / STATE_FILE).write_text(json.dumps({"step": step, "tokens_seen": tokens_seen}))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    shutil.rmtree(directory, ignore_errors=True)


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def _mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().cpu().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def _across_ranks(loss: torch.Tensor, tokens: int, report_due: bool,
                  extra: dict[str, float]) -> tuple[float, int, bool, dict[str, float]]:
    """Mean loss, total tokens, whether any rank's report clock ran out, and the mean of the
    objective's own metrics, in one all-reduce.
    Ranks' clocks differ (a loaded machine, a slow node): if each decided alone, one rank would
    wait in `ray.train.report` while another waits in the next step's all-reduce, forever."""
    names = sorted(extra)
    values = torch.tensor([float(loss), float(tokens), float(report_due)] + [float(extra[k]) for k in names],
                          dtype=torch.float64)
    dist.all_reduce(values)
    world = dist.get_world_size()
    means = {k: float(v) / world for k, v in zip(names, values[3:])}
    return float(values[0]) / world, int(values[1]), bool(values[2] > 0), means
