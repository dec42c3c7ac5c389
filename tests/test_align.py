"""The align stage end to end on Ray Train + DeepSpeed (2 CPU workers, a tiny random Llama):
a reward model learns to rank, DPO's implicit reward margin grows and its log-ratio matches an
independent computation, and GRPO raises a rule reward with rollouts from the serve engine whose
weights follow the trained ones, even after its rollout actor is killed."""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from internray.align.config import AlignConfig
from internray.align.data import tokenize_pair
from internray.align.losses import sequence_logprobs
from internray.align.pairwise import collate_pairs
from internray.align.run import run_align
from internray.config import ConfigError, validate_config
from internray.runs import read_manifest
from internray.train.pretrain import read_metrics
from internray.train.sft import IGNORE

from conftest import build_tiny_llama

WORDS = "alpha beta gamma delta river stone cloud paper window garden".split()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a small vocabulary (300), so digits are common enough in random samples
    for a rule reward to have a signal from the first GRPO step."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "policy", vocab_size=300)


def preference_pairs(path: Path, count: int, seed: int) -> Path:
    """Separable by one word: the chosen response ends in `good`, the rejected one in `bad`."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            filler = " ".join(rng.choice(WORDS) for _ in range(4))
            f.write(json.dumps({"prompt": f"Tell me about {rng.choice(WORDS)}.", "chosen": f"{filler} good",
                                "rejected": f"{filler} bad"}) + "\n")
        f.write("{not json\n")
    return path


def align_config(root: Path, model: Path, method: str, data: Path, **sections) -> AlignConfig:
    config = {"run": {"root": str(root)}, "model": {"path": str(model)},
              "align": {"method": method, "data": str(data), "max_len": 64} | sections.pop("align", {}),
              "optimizer": {"lr": 1e-3, "weight_decay": 0.0}, "lr_scheduler": {"warmup_steps": 0, "min_lr_ratio": 1.0},
              "training": {"steps": 10, "micro_batch_size": 4, "precision": "fp32"},
              "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "checkpoint": {"every_steps": 100}}
    for key, value in sections.items():
        config[key] = config.get(key, {}) | value
    return validate_config(AlignConfig, config)


def test_align_config_is_checked_up_front(tmp_path, policy_dir):
    data = preference_pairs(tmp_path / "pairs.jsonl", 4, seed=0)
    with pytest.raises(ConfigError, match="align.bta"):
        validate_config(AlignConfig, {"model": {"path": str(policy_dir)}, "align": {"method": "dpo", "data": str(data), "bta": 1}})
    with pytest.raises(ConfigError, match="set model.path"):
        validate_config(AlignConfig, {"align": {"method": "dpo", "data": str(data)}})
    with pytest.raises(ConfigError, match="rl.reward=model together with rl.reward_model"):
        validate_config(AlignConfig, {"model": {"path": str(policy_dir)},
                                      "align": {"method": "grpo", "data": str(data), "rl": {"reward": "model"}}})


def test_reward_model_ranks_chosen_above_rejected_on_held_out_pairs(ray_cluster, tmp_path, policy_dir):
    train = preference_pairs(tmp_path / "train.jsonl", 64, seed=0)
    run = run_align(align_config(tmp_path / "runs", policy_dir, "reward", train, align={"tuning": "full"},
                                 training={"steps": 16}))
    manifest = read_manifest(run.dir)
    assert manifest["status"] == "complete" and manifest["counts"] == {"records": 64, "rejected": 1}
    assert json.loads(run.path("align_rejects.jsonl").read_text())["reason"].startswith("not valid JSON")

    tokenizer = AutoTokenizer.from_pretrained(run.path("hf"))
    model = AutoModelForSequenceClassification.from_pretrained(run.path("hf")).eval()
    held_out = [json.loads(line) for line in preference_pairs(tmp_path / "held_out.jsonl", 32, seed=1).read_text().splitlines()[:-1]]
    wins = 0
    with torch.no_grad():
        for record in held_out:
            row = tokenize_pair(tokenizer, record, 64)
            chosen, rejected = (model(input_ids=torch.tensor([row[f"{side}_ids"]])).logits[0, 0] for side in ("chosen", "rejected"))
            wins += bool(chosen > rejected)
    assert wins / len(held_out) >= 0.9


def test_dpo_margin_grows_and_the_log_ratio_matches_an_independent_computation(ray_cluster, tmp_path, policy_dir):
    data = preference_pairs(tmp_path / "pairs.jsonl", 64, seed=0)
    run = run_align(align_config(tmp_path / "runs", policy_dir, "dpo", data,
                                 align={"tuning": "lora", "beta": 0.5, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                                 optimizer={"lr": 3e-3}, training={"steps": 12}))
    history = read_metrics(run.path("metrics.jsonl"))
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert history[-1]["reward_margin"] > 0.2 and history[-1]["reward_accuracy"] == 1.0
    assert history[-1]["loss"] < history[0]["loss"]

    # the exported policy against the base, computed two ways: internray's batched, padded
    # sequence_logprobs, and a plain loop over each unpadded prefix with transformers
    tokenizer = AutoTokenizer.from_pretrained(run.path("hf"))
    policy = AutoModelForCausalLM.from_pretrained(run.path("hf")).eval()
    base = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    records = [json.loads(line) for line in data.read_text().splitlines()[:4]]
    rows = [tokenize_pair(tokenizer, r, 64) for r in records]
    import pyarrow as pa

    ids, labels = collate_pairs(pa.Table.from_pylist(rows), pad_id=0)
    with torch.no_grad():
        batched = sequence_logprobs(policy(input_ids=ids).logits, labels)[0] - sequence_logprobs(base(input_ids=ids).logits, labels)[0]

        def loop_logprob(model, seq, lab):
            return sum(float(model(input_ids=torch.tensor([seq[:t]])).logits[0, -1].log_softmax(-1)[seq[t]])
                       for t in range(1, len(seq)) if lab[t] != IGNORE)

        independent = [loop_logprob(policy, r[f"{s}_ids"], r[f"{s}_labels"]) - loop_logprob(base, r[f"{s}_ids"], r[f"{s}_labels"])
                       for s in ("chosen", "rejected") for r in rows]
    assert batched.tolist() == pytest.approx(independent, abs=1e-3)
    half = len(rows)
    assert all(c > r for c, r in zip(independent[:half], independent[half:]))  # chosen's log-ratio above rejected's


def sum_prompts(path: Path) -> Path:
    """`a+b=` with a one-digit answer, rewarded when the completion contains it."""
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a, b in ((rng.randint(0, 4), rng.randint(0, 5)) for _ in range(64))))
    return path


def test_grpo_raises_a_rule_reward_and_survives_a_killed_rollout_actor(ray_cluster, tmp_path, policy_dir):
    prompts = sum_prompts(tmp_path / "prompts.jsonl")
    config = align_config(tmp_path / "runs", policy_dir, "grpo", prompts, optimizer={"lr": 1e-2}, training={"steps": 24},
                          align={"tuning": "full", "rl": {"group_size": 8, "max_new_tokens": 24, "kl_coef": 0.0,
                                                            "verify_weights": True, "rollout_dtype": "float32"}})
    pids, errors = {}, []

    def kill_rollout_actor_mid_run():
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                metrics = list((tmp_path / "runs").glob("align-*/metrics.jsonl"))
                if metrics and len(metrics[0].read_text().splitlines()) >= 3:
                    actor = ray.get_actor(f"{metrics[0].parent.name}-rollout-0")
                    pids["before"] = ray.get(actor.pid.remote())
                    ray.kill(actor, no_restart=False)
                    # the kill is asynchronous: the old process may still answer a call or two
                    while time.time() < deadline and pids.get("after", pids["before"]) == pids["before"]:
                        try:
                            pids["after"] = ray.get(actor.pid.remote(), timeout=60)
                        except ray.exceptions.RayError:  # dying or restarting: ask again
                            time.sleep(0.1)
                    return
                time.sleep(0.05)
        except Exception as err:  # surfaced by the assertion below, not lost in the thread
            errors.append(repr(err))

    killer = threading.Thread(target=kill_rollout_actor_mid_run, daemon=True)
    killer.start()
    run = run_align(config)
    killer.join(timeout=60)
    assert not errors and pids.get("before") not in (None, pids.get("after")), (errors, pids)

    history = read_metrics(run.path("metrics.jsonl"))
    assert [h["step"] for h in history] == list(range(1, 25))
    # after every refresh (the restarted actor included) the rollout engine scores a sampled
    # sequence exactly as the trained policy does
    assert max(h["rollout_logprob_diff"] for h in history) < 1e-4
    first, last = (sum(h["reward_mean"] for h in part) / len(part) for part in (history[:6], history[-6:]))
    assert last > first + 0.1, (first, last)
    assert all(h["rollout_s"] > 0 and h["response_length"] > 0 for h in history)


def test_ppo_value_head_learns_the_reward_and_the_export_is_the_policy_alone(ray_cluster, tmp_path, policy_dir):
    prompts = sum_prompts(tmp_path / "prompts.jsonl")
    run = run_align(align_config(tmp_path / "runs", policy_dir, "ppo", prompts, optimizer={"lr": 1e-2},
                                 training={"steps": 24},
                                 align={"tuning": "full", "rl": {"group_size": 8, "max_new_tokens": 24, "kl_coef": 0.0,
                                                                 "verify_weights": True, "rollout_dtype": "float32"}}))
    history = read_metrics(run.path("metrics.jsonl"))
    first, last = (sum(h["reward_mean"] for h in part) / len(part) for part in (history[:6], history[-6:]))
    assert last > first + 0.1, (first, last)
    assert history[0]["value_mean"] == 0.0  # the value head starts at zero ...
    assert sum(h["value_mean"] for h in history[-6:]) / 6 > 0.05  # ... and learns that rewards come
    assert max(h["rollout_logprob_diff"] for h in history) < 1e-4
    exported = AutoModelForCausalLM.from_pretrained(run.path("hf"))  # a plain causal LM: no value head
    assert not any("value_head" in name for name, _ in exported.named_parameters())
