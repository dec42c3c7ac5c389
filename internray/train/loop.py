"""The per-worker training loop, shared by pretraining and finetuning.

Ray Train starts one copy per worker inside a torch.distributed group (gloo on CPU, NCCL on
GPU); DeepSpeed wraps the model in that group. The loop is the nanoGPT loop with three
additions: it resumes from the latest checkpoint Ray Train hands back (skipping the batches
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
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import torch
import torch.distributed as dist

from internray.train.config import TrainConfig
from internray.train.engine import deepspeed_config, flops_per_token, optimizer_and_schedule, peak_flops

CHECKPOINT_TAG = "ds"
REPORT_EVERY_S = 10.0
STATE_FILE = "train_state.json"


def train_loop_per_worker(config_dict: dict) -> None:
    import deepspeed

    config = TrainConfig.model_validate(config_dict["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config.training.seed)
    torch.set_num_threads(config.scaling.threads_per_worker)

    model = build_model(config, config_dict["vocab_size"])
    if config.training.activation_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer, schedule = optimizer_and_schedule(model, config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(config))
    step, tokens_seen = restore(engine)
    batches = micro_batches(ray.train.get_dataset_shard("train"), config.training.micro_batch_size,
                            config_dict["pad_id"], skip=step * config.training.grad_accum_steps)
    per_token = flops_per_token(model.config, config_dict["seq_len"])
    peak = peak_flops(config)
    metrics_file = Path(config_dict["metrics_file"]) if rank == 0 else None

    gauges = TrainGauges(config_dict["run_id"]) if rank == 0 else None
    last_report = step_end = time.perf_counter()
    while step < config.training.steps:
        engine.train()
        losses, step_tokens = [], 0
        for _ in range(config.training.grad_accum_steps):
            input_ids, labels = next(batches)
            loss = engine(input_ids=input_ids.to(engine.device), labels=labels.to(engine.device)).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            step_tokens += int((labels != -100).sum())
        step += 1
        due = time.perf_counter() - last_report >= REPORT_EVERY_S
        mean_loss, global_tokens, report_due = _across_ranks(torch.stack(losses).mean(), step_tokens, due)
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
        }
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
    """Per-step metrics into Ray's metrics pipeline (the dashboard's Metrics view), from rank 0.

    Ray Train's own `report` blocks until its controller collects it (it polls every ~2 s), so
    the loop reports to Ray Train only every REPORT_EVERY_S and at checkpoints; these gauges
    carry every step without waiting.
    """

    NAMES = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "val_loss")

    def __init__(self, run_id: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run_id}
        self.gauges = {name: Gauge(f"internray_train_{name}", f"train {name}", tag_keys=("run",)) for name in self.NAMES}

    def set(self, metrics: dict) -> None:
        for name, gauge in self.gauges.items():
            if name in metrics:
                gauge.set(float(metrics[name]), tags=self.tags)


def build_model(config: TrainConfig, vocab_size: int, quantize: bool = True) -> torch.nn.Module:
    """The base model (checkpoint or preset), wrapped in LoRA adapters when finetuning with them.

    QLoRA loads the base in 4-bit NF4 (bitsandbytes, CUDA only); `quantize=False` builds the
    same module unquantized, as the exporter needs to merge adapters on a CPU.
    """
    from transformers import AutoModelForCausalLM

    method = config.finetune.method if config.finetune is not None else "full"
    if config.model.path is not None:
        kwargs = {"dtype": torch.float32}
        if method == "qlora" and quantize:
            from transformers import BitsAndBytesConfig

            kwargs = {"quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)}
        model = AutoModelForCausalLM.from_pretrained(config.model.path, **kwargs)
    else:
        from internray.models.presets import model_config

        shape = model_config(config.model.preset, vocab_size=vocab_size,
                             max_position_embeddings=config.model.max_position_embeddings)
        model = AutoModelForCausalLM.from_config(shape, dtype=torch.float32)
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora" and quantize:
        model = prepare_model_for_kbit_training(model)
    lora = config.finetune.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def micro_batches(shard, batch_size: int, pad_id: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (epoch after epoch) padded micro-batches of packed sequences; labels -100 on pads."""
    seen = 0
    while True:
        produced = False
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True):
            produced = True
            seen += 1
            if seen <= skip:
                continue
            yield collate(batch, pad_id)
        if not produced:
            raise ValueError("the training shard is empty or smaller than one micro-batch")


def collate(batch: pa.Table, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row. Labels are the tokens themselves (pretraining) or the `labels`
    column (SFT: -100 on everything the model should not learn to say); pads are -100."""
    rows = batch.column("input_ids").to_pylist()
    targets = batch.column("labels").to_pylist() if "labels" in batch.column_names else rows
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    for i, (row, target) in enumerate(zip(rows, targets)):
        ids[i, : len(row)] = row
        labels[i, : len(target)] = target
    return torch.from_numpy(ids), torch.from_numpy(labels)


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


def _across_ranks(loss: torch.Tensor, tokens: int, report_due: bool) -> tuple[float, int, bool]:
    """Mean loss, total tokens, and whether any rank's report clock ran out, in one all-reduce.
    Ranks' clocks differ (a loaded machine, a slow node): if each decided alone, one rank would
    wait in `ray.train.report` while another waits in the next step's all-reduce, forever."""
    values = torch.tensor([float(loss), float(tokens), float(report_due)], dtype=torch.float64)
    dist.all_reduce(values)
    return float(values[0]) / dist.get_world_size(), int(values[1]), bool(values[2] > 0)
