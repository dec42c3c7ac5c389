"""The train stage on 2 CPU workers with a tiny InternLM3 model: real Ray Train, real DeepSpeed.

Shards are built the way the data stage builds them (its tokenizer trainer and packer) from the
standard library's docstrings, so these tests need no data run.
"""
from __future__ import annotations

import importlib
import inspect
import json
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from internray.config import validate_config
from internray.data.tokenize import pack, train_tokenizer
from internray.runs import read_manifest
from internray.train.config import TrainConfig
from internray.train.engine import optimizer_and_schedule
from internray.train.objective import build_model, collate
from internray.train.pretrain import read_metrics, run_pretrain

SEQ_LEN = 64
MODULES = ["argparse", "collections", "json", "logging", "pickle", "inspect", "random", "re", "socket", "difflib"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    texts = [inspect.getdoc(importlib.import_module(m)) for m in MODULES]
    train_tokenizer(texts * 3, vocab_size=400, min_frequency=1, out=root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    table = pack(docs, SEQ_LEN)
    table = table.filter(torch.tensor(table.column("num_tokens").to_pylist()).eq(SEQ_LEN).numpy())
    for split, rows in (("train", table.slice(0, len(table) - 8)), ("validation", table.slice(len(table) - 8))):
        (root / split).mkdir()
        pq.write_table(rows, root / split / "part-0.parquet")
    return root


def config(shards: Path, tmp_path: Path, **sections) -> TrainConfig:
    base = {
        "run": {"root": str(tmp_path / "runs")},
        "model": {"preset": "tiny", "tokenizer": str(shards / "tokenizer")},
        "data": {"train": str(shards / "train"), "validation": str(shards / "validation")},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "lr_scheduler": {"warmup_steps": 2},
        "training": {"steps": 16, "micro_batch_size": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2},
        "checkpoint": {"every_steps": 8},
        "validation": {"every_steps": 8, "batches": 2},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return validate_config(TrainConfig, base)


def logits_of(model_dir: Path, shards: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = torch.tensor(pq.read_table(shards / "validation").column("input_ids").to_pylist()[:2])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, shards, tmp_path_factory):
    return run_pretrain(config(shards, tmp_path_factory.mktemp("zero2")))


def test_loss_decreases_and_everything_is_recorded(zero2_run):
    history = read_metrics(zero2_run.path("metrics.jsonl"))
    assert [h["step"] for h in history] == list(range(1, 17))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert all(h["tokens_per_s"] > 0 and 0 < h["mfu"] < 1 and h["grad_norm"] > 0 for h in history)
    assert history[-1]["tokens_seen"] == 16 * 2 * 2 * SEQ_LEN
    assert "val_loss" in history[7] and "val_loss" in history[15]
    manifest = read_manifest(zero2_run.dir)
    assert manifest["status"] == "complete" and manifest["metrics"]["step"] == 16
    assert Path(manifest["outputs"]["loss_curve"]).stat().st_size > 1000


def test_zero3_export_reloads_with_the_same_weights_as_zero2(zero2_run, shards, tmp_path):
    zero3 = run_pretrain(config(shards, tmp_path, scaling={"zero_stage": 3}))
    assert read_manifest(zero3.dir)["status"] == "complete"
    torch.testing.assert_close(logits_of(zero3.path("hf"), shards), logits_of(zero2_run.path("hf"), shards),
                               atol=2e-3, rtol=1e-3)


def test_deepspeed_matches_a_plain_pytorch_loop(ray_cluster, shards, tmp_path):
    """Same seed, data and global batch: one DeepSpeed worker and a plain loop give the same losses."""
    cfg = config(shards, tmp_path, scaling={"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 2},
                 training={"steps": 6}, checkpoint={"every_steps": 6})
    ours = [h["loss"] for h in read_metrics(run_pretrain(cfg).path("metrics.jsonl"))]

    tokenizer = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, len(tokenizer))
    optimizer, schedule = optimizer_and_schedule(model, cfg)
    rows = pq.read_table(shards / "train")
    plain = []
    for step in range(6):
        input_ids, labels = collate(rows.slice(step * 2, 2), tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        plain.append(loss.item())
    assert ours == pytest.approx(plain, rel=1e-3)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, shards, tmp_path):
    cfg = config(shards, tmp_path, training={"steps": 40}, checkpoint={"every_steps": 4, "max_failures": 2})
    killed: list[int] = []

    def kill_a_worker_after_a_collected_checkpoint():
        """Past step 9 the step-8 report (a checkpoint) has been handed over, which Ray Train's
        one-slot report queue allows only once the step-4 checkpoint was collected."""
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            metrics = list(Path(cfg.run.root).glob("pretrain-*/metrics.jsonl"))
            lines = metrics[0].read_text().splitlines() if metrics else []
            if lines and json.loads(lines[-1])["step"] >= 10:
                for proc in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.pid)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_after_a_collected_checkpoint)
    killer.start()
    run = run_pretrain(cfg)
    killer.join()
    assert killed, "no training worker was found to kill"
    steps = [json.loads(line)["step"] for line in run.path("metrics.jsonl").read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] > 1 and (steps[restart] - 1) % 4 == 0  # resumed right after a checkpoint, not from scratch
    assert steps[restart] <= steps[restart - 1]  # and redid the steps after it
    assert steps[-1] == 40 and read_manifest(run.dir)["status"] == "complete"
    history = read_metrics(run.path("metrics.jsonl"))
    assert history[-1]["tokens_seen"] == 40 * 2 * 2 * SEQ_LEN  # no step counted twice
