"""The train stage's job config (pretraining and finetuning share it), torchtitan-style sections."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from internray.config import ExistingPath, Section
from internray.runs import RunSection


class ModelSection(Section):
    preset: str | None = "tiny"
    """An InternLM3-shaped preset from `internray.models.presets` (random init), or ..."""
    path: ExistingPath | None = None
    """... an HF checkpoint directory to start from (finetuning, continued pretraining)."""
    tokenizer: ExistingPath | None = None
    """Tokenizer directory; defaults to the data run's tokenizer, or the checkpoint's own."""
    max_position_embeddings: int = Field(4096, ge=16)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of `model.preset` and `model.path`")
        return self


class DataSection(Section):
    from_run: Literal["latest"] | ExistingPath | None = None
    """A data run (directory, or `latest`: the newest complete one under `run.root`) whose
    train/validation shards and tokenizer to use; explicit `train`/`validation` win."""
    train: ExistingPath | None = None
    """Packed Parquet shards (a data run's `stages/train`)."""
    validation: ExistingPath | None = None


class OptimizerSection(Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)


class LRSchedulerSection(Section):
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""


class TrainingSection(Section):
    steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    seed: int = 0


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs reserved per worker. Leave some CPUs unreserved: Ray Data streams the shards
    with them (on a 2-core laptop, 2 workers x 0.5)."""
    threads_per_worker: int = Field(1, ge=1)
    """torch intra-op threads per worker (Ray Train sets OMP_NUM_THREADS=1 otherwise)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    shared_memory_collectives: bool = True
    """CPU workers all on one node reduce gradients and gather parameters through DeepSpeed's
    shared-memory kernel instead of gloo's TCP loopback (train/cpu_collectives.py)."""
    offload_optimizer: bool = False
    offload_params: bool = False
    peak_flops_per_worker: float | None = Field(None, gt=0)
    """For MFU. Default: the device's dense bf16 peak on GPU, a measured matmul rate on CPU."""

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("scaling.offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("scaling.offload_optimizer needs zero_stage >= 1")
        return self


class CheckpointSection(Section):
    every_steps: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0)
    """Worker failures survived by restarting from the last checkpoint."""


class ValidationSection(Section):
    every_steps: int = Field(50, ge=1)
    batches: int = Field(8, ge=1)


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


class FinetuneSection(Section):
    """XTuner's job: SFT on conversations, or incremental pretraining on raw text (`format: text`)."""

    data: ExistingPath
    """A JSONL file of alpaca, sharegpt, OpenAI-messages or text records."""
    format: Literal["auto", "alpaca", "sharegpt", "openai", "text"] = "auto"
    method: Literal["full", "lora", "qlora"] = "lora"
    max_len: int = Field(2048, ge=8)
    lora: LoraSection = Field(default_factory=LoraSection)


class TrainConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = Field(default_factory=LRSchedulerSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    finetune: FinetuneSection | None = None

    def tuning(self) -> tuple[str, LoraSection]:
        """Which parameters train (full, lora, qlora), and the LoRA shape when adapters do."""
        if self.finetune is None:
            return "full", LoraSection()
        return self.finetune.method, self.finetune.lora

    def has_own_data(self) -> bool:
        """Whether the job brings its own data (finetuning JSONL) instead of packed shards."""
        return self.finetune is not None

    @model_validator(mode="after")
    def _qlora_needs_cuda(self):
        if self.finetune is not None and self.finetune.method == "qlora" and not self.scaling.use_gpu:
            raise ValueError("finetune.method=qlora needs CUDA GPUs and bitsandbytes (4-bit weights have no CPU "
                             "kernels here): set scaling.use_gpu=true on a GPU cluster, or use finetune.method=lora")
        return self

    @model_validator(mode="after")
    def _resolve_data_run(self):
        if self.data.from_run is not None:
            run_dir = latest_run(self.run.root, "data") if self.data.from_run == "latest" else Path(self.data.from_run)
            stages = run_dir / "stages"
            if self.data.train is None:
                self.data.train = stages / "train"
            if self.data.validation is None and (stages / "validation").is_dir():
                self.data.validation = stages / "validation"
        if self.data.train is None and not self.has_own_data():
            raise ValueError("set `data.train` (packed shards) or `data.from_run` (a data run, or `latest`)")
        return self


def latest_run(root: Path, stage: str) -> Path:
    """The newest complete run of `stage` under `root`."""
    for manifest in sorted(Path(root).glob(f"{stage}-*/manifest.json"), reverse=True):
        if json.loads(manifest.read_text()).get("status") == "complete":
            return manifest.parent
    raise ValueError(f"no complete {stage} run under {root}")


def tokenizer_dir(config: TrainConfig) -> Path | None:
    """The tokenizer that goes with the data: explicit, else the data run's, else the checkpoint's."""
    if config.model.tokenizer is not None:
        return Path(config.model.tokenizer)
    if config.data.train is not None and (Path(config.data.train).parent / "tokenizer").is_dir():
        return Path(config.data.train).parent / "tokenizer"
    return Path(config.model.path) if config.model.path is not None else None
