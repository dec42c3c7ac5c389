"""`internray pretrain CONFIG`: train a causal LM on a data run's packed shards.

The driver validates the config, opens (or resumes) the run directory, hands the shards to Ray
Train as a Ray Data dataset (streamed and split across workers), runs the shared worker loop
under DeepSpeed, and exports the final checkpoint as a Hugging Face directory with a loss curve.
Rerunning an interrupted run resumes it: the run directory, and with it Ray Train's run name
and storage, is the same, so Ray Train hands the loop its latest checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from internray.runs import Run, open_run
from internray.train.config import TrainConfig, tokenizer_dir
from internray.train.engine import scaling_kwargs
from internray.train.export import export_hf
from internray.train.loop import train_loop_per_worker
from internray.train.objective import LanguageModeling, Objective


def run_pretrain(config: TrainConfig) -> Run:
    run = open_stage_run("pretrain", config)
    run.add_input(config.data.train, role="train")
    if config.data.validation is not None:
        run.add_input(config.data.validation, role="validation")
    return fit(LanguageModeling(config), run, load_tokenizer(config))


def open_stage_run(stage: str, config: TrainConfig) -> Run:
    run = open_run(stage, config, config.run.root, config.run.resume)
    print(f"[internray {stage} {run.run_id}] run directory {run.dir}" + (" (resuming)" if run.resumed else ""), flush=True)
    if config.model.path is not None:
        run.add_input(config.model.path, role="base_model")
    return run


def load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(config)))


def fit(objective: Objective, run: Run, tokenizer) -> Run:
    """Minimize `objective` on `config.data.train` with Ray Train + DeepSpeed, then export, plot
    and finish the run."""
    config = objective.config
    stage = run.manifest["stage"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loop_config = {
        "objective": objective,
        "vocab_size": len(tokenizer),
        "pad_id": pad_id,
        "seq_len": objective.sequence_length(config.data.train),
        "metrics_file": str(run.path("metrics.jsonl").resolve()),
        "run_id": run.run_id,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(**scaling_kwargs(config)),
        run_config=RunConfig(
            name=run.run_id, storage_path=str(run.path("ray").resolve()),
            failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
        ),
        datasets={"train": objective.dataset(config.data.train)},
    )
    result = trainer.fit()
    history = read_metrics(run.path("metrics.jsonl"))
    export_hf(result.checkpoint.path, objective.build_model(len(tokenizer), quantize=False), tokenizer, run.path("hf"),
              adapter_only=config.tuning()[0] == "qlora", unwrap=objective.exported)
    run.add_output("hf", run.path("hf"))
    plot_losses(history, run.path("loss.png"))
    run.add_output("loss_curve", run.path("loss.png"))
    run.add_output("metrics", run.path("metrics.jsonl"))
    last = history[-1]
    run.update(metrics={k: v for k, v in last.items() if k not in ("lr", "grad_norm", "memory_gb")})
    run.finish()
    print(f"[internray {stage} {run.run_id}] done: HF checkpoint in {run.path('hf')}", flush=True)
    return run


def read_metrics(path: Path) -> list[dict]:
    """Per-step metrics; a step redone after a restart keeps its last record."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(history: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    validated = [h for h in history if "val_loss" in h]
    if validated:
        ax.plot([h["step"] for h in validated], [h["val_loss"] for h in validated], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
