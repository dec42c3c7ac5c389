"""Online RL with rollouts from the serve engine: what GRPO and PPO share, and GRPO itself.

Each micro-batch is a handful of prompts. The worker asks its rollout actor for `group_size`
sampled completions per prompt, scores them (a rule against the prompt's answer, or a reward
model) and computes the loss of its method on prompt + completion. After every optimizer step
rank 0 publishes the new weights and all ranks learn the new version before they roll out
again, so every rollout is on-policy and each batch gets one update (PPO's clipped ratio is
then exactly 1; the clipping matters only for several epochs over one batch, which this loop
does not do).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist

from internray.align.losses import IGNORE, group_advantages, grpo_loss, token_logprobs
from internray.align.reference import ReferencePolicy
from internray.align.rewards import RULES
from internray.align.rollout import RolloutPool
from internray.train.objective import Objective, StepLoss, micro_batches, pad_rows


def collate_prompts(batch: pa.Table, pad_id: int) -> tuple[list[list[int]], list[str]]:
    return batch.column("prompt_ids").to_pylist(), batch.column("answer").to_pylist()


def policy_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy as a plain HF state dict on the CPU; LoRA adapters are merged into their base
    weights (computed, not merged in place, so the trained module is untouched)."""
    if not hasattr(module, "get_base_model"):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = module.get_base_model()
    weights = {k.replace(".base_layer", ""): v.detach().cpu() for k, v in base.state_dict().items() if "lora_" not in k}
    for name, layer in base.named_modules():
        if isinstance(layer, LoraLayer):
            merged = layer.base_layer.weight + layer.get_delta_weight("default")
            weights[f"{name}.weight"] = merged.detach().cpu()
    return weights


@dataclass
class Rollout:
    """One micro-batch's samples: `group_size` completions per prompt, prompt-major."""
    ids: torch.Tensor  # prompt + completion, right-padded
    labels: torch.Tensor  # completion tokens; IGNORE on prompt and padding
    rewards: torch.Tensor  # one per completion
    seconds: float  # waiting for the completions, the weight refresh included
    sync_seconds: float  # of which: the rollout actor taking the new weights
    response_lengths: list[int]

    def metrics(self) -> dict[str, float]:
        return {"reward_mean": float(self.rewards.mean()),
                "reward_std": float(self.rewards.std()) if len(self.rewards) > 1 else 0.0,
                "response_length": sum(self.response_lengths) / len(self.response_lengths), "rollout_s": self.seconds,
                "weight_sync_s": self.sync_seconds}


class OnlineRL(Objective):
    def __init__(self, config, pool: RolloutPool, pad_id: int):
        super().__init__(config)
        self.pool, self.pad_id = pool, pad_id
        self.version = None

    def policy(self, module: torch.nn.Module) -> torch.nn.Module:
        """The causal LM inside what DeepSpeed trains (PPO adds a value head around it)."""
        return module

    # -- setup --------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> None:
        self.reference = ReferencePolicy(self.policy(model))

    def start(self, engine, step: int) -> None:
        self.rank = dist.get_rank()
        self.reference.place_like(engine.module, engine.device)
        self.probe = None
        self.rollouts = step * self.config.training.grad_accum_steps  # a resumed run continues the seed sequence
        self._publish(engine)

    def batches(self, pad_id: int, skip: int):
        return micro_batches(ray.train.get_dataset_shard("train"), self.config.training.micro_batch_size,
                             pad_id, skip, collate_prompts)

    def dataset(self, shards: Path):
        # read here, not by Ray Data tasks: the rollout actors hold the CPU those tasks would wait
        # for, and the prompts are a few KB
        return ray.data.from_arrow(pq.read_table(shards))

    def sequence_length(self, shards: Path) -> int:
        first = sorted(Path(shards).glob("*.parquet"))[0]
        prompt = pq.ParquetFile(first).read_row_group(0, columns=["prompt_ids"]).column(0)[0]
        return len(prompt) + self.config.align.rl.max_new_tokens

    # -- rollouts and rewards -------------------------------------------------------------------
    def rollout(self, engine, batch) -> Rollout:
        rl = self.config.align.rl
        prompts, answers = batch
        seed = hash((self.config.training.seed, self.rollouts, self.rank)) % 2**31  # ints hash the same in every process
        self.rollouts += 1
        worker, started = self.pool.worker(self.rank), time.perf_counter()
        ray.get(worker.sync.remote(self.version))  # also done by `generate`; here to time it apart
        synced = time.perf_counter()
        completions = ray.get(worker.generate.remote(
            prompts, rl.group_size, rl.max_new_tokens, rl.temperature, rl.top_p, self.version, seed))
        seconds = time.perf_counter() - started
        prompt_of = [p for p in prompts for _ in range(rl.group_size)]
        rows = [p + c["token_ids"] for p, c in zip(prompt_of, completions)]
        targets = [[IGNORE] * len(p) + c["token_ids"] for p, c in zip(prompt_of, completions)]
        rewards = torch.tensor(self.rewards(rows, completions, [a for a in answers for _ in range(rl.group_size)]))
        self.probe = rows[0]
        ids, labels = (t.to(engine.device) for t in pad_rows(rows, targets, self.pad_id))
        return Rollout(ids, labels, rewards, seconds, synced - started, [len(c["token_ids"]) for c in completions])

    def rewards(self, rows: list[list[int]], completions: list[dict], answers: list[str]) -> list[float]:
        rl = self.config.align.rl
        if rl.reward == "model":
            return ray.get(self.pool.scorer.score.remote(rows))
        rule = RULES[rl.reward]
        return [rule(c["text"], a) for c, a in zip(completions, answers)]

    def reference_logits(self, engine, ids: torch.Tensor) -> torch.Tensor:
        return self.reference.logits(self.policy(engine.module), ids)

    # -- after the optimizer step ------------------------------------------------------------------
    def after_step(self, engine, step: int) -> dict[str, float]:
        started = time.perf_counter()
        self._publish(engine)
        metrics = {"publish_s": time.perf_counter() - started}
        if self.config.align.rl.verify_weights:
            metrics["rollout_logprob_diff"] = self._rollout_logprob_diff(engine)
        return metrics

    def _publish(self, engine) -> None:
        """Rank 0 publishes the current weights; every rank learns the new version (a broadcast,
        so no rank rolls out before the weights are in the object store)."""
        box = [self.pool.publish(policy_weights(self.policy(engine.module))) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        self.version = box[0]

    @torch.no_grad()
    def _rollout_logprob_diff(self, engine) -> float:
        """Largest difference between the rollout actor's and the trained policy's log-probabilities
        of this rank's last rollout: zero (up to float error) when the refresh worked."""
        remote = torch.tensor(ray.get(self.pool.worker(self.rank).logprobs.remote(self.probe, self.version)))
        policy = self.policy(engine.module)
        was_training = policy.training
        policy.eval()
        ids = torch.tensor([self.probe], device=engine.device)
        logits = policy(input_ids=ids).logits[0, :-1].float()
        policy.train(was_training)
        local = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0].cpu()
        return float((remote - local).abs().max())


class GRPO(OnlineRL):
    """Group-relative policy optimization (DeepSeekMath): advantages are each completion's reward
    standardized within its prompt's group, so no value model is needed."""

    def loss(self, engine, batch) -> StepLoss:
        rl = self.config.align.rl
        rollout = self.rollout(engine, batch)
        advantages = group_advantages(rollout.rewards, rl.group_size)
        logp, mask = token_logprobs(engine(input_ids=rollout.ids).logits, rollout.labels)
        with torch.no_grad():
            reference, _ = token_logprobs(self.reference_logits(engine, rollout.ids), rollout.labels)
        loss, policy_loss, kl = grpo_loss(logp, reference, mask, advantages.to(logp.device), rl.kl_coef)
        return StepLoss(loss, int(mask.sum()), rollout.metrics() | {"kl": float(kl), "policy_loss": float(policy_loss)})
