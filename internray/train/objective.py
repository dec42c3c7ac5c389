"""What a training step minimizes: the one piece that differs between pretraining, SFT and the
alignment methods, so all of them share one loop (`loop.py`), one checkpoint format and one export.

An `Objective` builds the model, turns this worker's dataset shard into micro-batches and turns a
micro-batch into a loss. `LanguageModeling` is next-token prediction on packed or SFT rows; the
alignment stage adds reward modelling, DPO/SimPO and GRPO (`internray.align`). The objective is
built on the driver with the validated config and pickled to every worker.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import ray.train
import torch

from internray.train.config import TrainConfig


@dataclass
class StepLoss:
    loss: torch.Tensor
    """The scalar to backpropagate."""
    tokens: int
    """Tokens trained on (for tokens/s and MFU)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Objective-specific numbers (averaged over micro-batches and ranks); the same keys every call."""


class Objective(abc.ABC):
    config: TrainConfig

    def __init__(self, config: TrainConfig):
        self.config = config

    def build_model(self, vocab_size: int, quantize: bool = True) -> torch.nn.Module:
        return build_model(self.config, vocab_size, quantize)

    def prepare(self, model: torch.nn.Module) -> None:
        """Called on each worker before DeepSpeed wraps `model` (e.g. to keep a frozen reference)."""

    def start(self, engine, step: int) -> None:
        """Called on each worker once the engine holds its (possibly restored) weights."""

    def batches(self, pad_id: int, skip: int) -> Iterator:
        """Endless micro-batches of this worker's shard of the `train` dataset, `skip` already seen."""
        return micro_batches(ray.train.get_dataset_shard("train"), self.config.training.micro_batch_size,
                             pad_id, skip, collate)

    @abc.abstractmethod
    def loss(self, engine, batch) -> StepLoss:
        """Forward one micro-batch through `engine` (DeepSpeed) and return what to backpropagate."""

    def after_step(self, engine, step: int) -> dict[str, float]:
        """Called on each worker after an optimizer step; returns extra metrics (same keys each step)."""
        return {}

    def dataset(self, shards: Path):
        """The `train` dataset: the Parquet shards, streamed and split across workers by Ray Data."""
        return ray.data.read_parquet(str(shards))

    def exported(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the trained module that becomes the HF export (PPO drops its value head)."""
        return model

    def sequence_length(self, shards: Path) -> int:
        """The training sequence length, for the FLOPs count: the first row's `input_ids`."""
        first = sorted(Path(shards).glob("*.parquet"))[0]
        return len(pq.ParquetFile(first).read_row_group(0, columns=["input_ids"]).column(0)[0])


class LanguageModeling(Objective):
    """Next-token cross-entropy on `labels` (pretraining: the tokens; SFT: the assistant's)."""

    def loss(self, engine, batch) -> StepLoss:
        input_ids, labels = batch
        loss = engine(input_ids=input_ids.to(engine.device), labels=labels.to(engine.device)).loss
        return StepLoss(loss, int((labels != -100).sum()))


def build_model(config: TrainConfig, vocab_size: int, quantize: bool = True, model_class=None) -> torch.nn.Module:
    """The base model (checkpoint or preset), wrapped in LoRA adapters when tuning with them.

    QLoRA loads the base in 4-bit NF4 (bitsandbytes, CUDA only); `quantize=False` builds the
    same module unquantized, as the exporter needs to merge adapters on a CPU. `model_class`
    (default: AutoModelForCausalLM) lets the reward model put a scalar head on the same base.
    """
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    method, lora = config.tuning()
    if config.model.path is not None:
        kwargs = {"dtype": torch.float32}
        if method == "qlora" and quantize:
            from transformers import BitsAndBytesConfig

            kwargs = {"quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)}
        if model_class is not AutoModelForCausalLM:
            kwargs["num_labels"] = 1
        model = model_class.from_pretrained(config.model.path, **kwargs)
    else:
        from internray.models.presets import model_config

        shape = model_config(config.model.preset, vocab_size=vocab_size,
                             max_position_embeddings=config.model.max_position_embeddings)
        model = model_class.from_config(shape, dtype=torch.float32)
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora" and quantize:
        model = prepare_model_for_kbit_training(model)
    task = "CAUSAL_LM" if model_class is AutoModelForCausalLM else "SEQ_CLS"  # SEQ_CLS also trains the new head
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type=task))


def micro_batches(shard, batch_size: int, pad_id: int, skip: int, collate_fn) -> Iterator:
    """Endless (epoch after epoch) micro-batches of `batch_size` rows through `collate_fn`."""
    seen = 0
    while True:
        produced = False
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True):
            produced = True
            seen += 1
            if seen <= skip:
                continue
            yield collate_fn(batch, pad_id)
        if not produced:
            raise ValueError("the training shard is empty or smaller than one micro-batch")


def collate(batch: pa.Table, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row. Labels are the tokens themselves (pretraining) or the `labels`
    column (SFT: -100 on everything the model should not learn to say); pads are -100."""
    rows = batch.column("input_ids").to_pylist()
    targets = batch.column("labels").to_pylist() if "labels" in batch.column_names else rows
    return pad_rows(rows, targets, pad_id)


def pad_rows(rows: list[list[int]], targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    for i, (row, target) in enumerate(zip(rows, targets)):
        ids[i, : len(row)] = row
        labels[i, : len(target)] = target
    return torch.from_numpy(ids), torch.from_numpy(labels)
