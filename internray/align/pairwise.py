"""Objectives trained on preference pairs: a reward model, DPO and SimPO.

Each micro-batch holds B pairs as 2B rows, chosen rows first, so one forward pass scores both
sides. DPO's reference is the starting policy (reference.py).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import torch

from internray.align.losses import (
    dpo_loss,
    pairwise_reward_loss,
    sequence_logprobs,
    simpo_loss,
)
from internray.align.reference import ReferencePolicy
from internray.train.objective import (
    Objective,
    StepLoss,
    build_model,
    micro_batches,
    pad_rows,
)


def collate_pairs(batch: pa.Table, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = batch.column("chosen_ids").to_pylist() + batch.column("rejected_ids").to_pylist()
    labels = batch.column("chosen_labels").to_pylist() + batch.column("rejected_labels").to_pylist()
    return pad_rows(rows, labels, pad_id)


class PairwiseObjective(Objective):
    def batches(self, pad_id: int, skip: int):
        return micro_batches(ray.train.get_dataset_shard("train"), self.config.training.micro_batch_size,
                             pad_id, skip, collate_pairs)

    def sequence_length(self, shards: Path) -> int:
        first = sorted(Path(shards).glob("*.parquet"))[0]
        return len(pq.ParquetFile(first).read_row_group(0, columns=["chosen_ids"]).column(0)[0])


def preference_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, float]:
    margin = chosen_reward - rejected_reward
    return {"reward_chosen": float(chosen_reward.mean()), "reward_rejected": float(rejected_reward.mean()),
            "reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).float().mean())}


class RewardModeling(PairwiseObjective):
    """A scalar head on the causal LM (transformers' *ForSequenceClassification, pooled at the last
    non-pad token), trained so that chosen responses score above rejected ones."""

    def __init__(self, config, pad_id: int):
        super().__init__(config)
        self.pad_id = pad_id

    def build_model(self, vocab_size: int, quantize: bool = True) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        model = build_model(self.config, vocab_size, quantize, model_class=AutoModelForSequenceClassification)
        model.config.pad_token_id = self.pad_id  # pooling finds each row's last token by it (exported too)
        return model

    def loss(self, engine, batch) -> StepLoss:
        ids, labels = batch
        scores = engine(input_ids=ids.to(engine.device)).logits[:, 0].float()
        half = len(ids) // 2
        loss = pairwise_reward_loss(scores[:half], scores[half:])
        return StepLoss(loss, int((labels != -100).sum()), preference_metrics(scores[:half].detach(), scores[half:].detach()))


class DPO(PairwiseObjective):
    def prepare(self, model: torch.nn.Module) -> None:
        self.reference = ReferencePolicy(model)

    def start(self, engine, step: int) -> None:
        self.reference.place_like(engine.module, engine.device)

    def loss(self, engine, batch) -> StepLoss:
        ids, labels = (t.to(engine.device) for t in batch)
        logp, _ = sequence_logprobs(engine(input_ids=ids).logits, labels)
        reference, _ = sequence_logprobs(self.reference.logits(engine.module, ids), labels)
        half = len(ids) // 2
        loss, chosen, rejected = dpo_loss(logp[:half], logp[half:], reference[:half], reference[half:],
                                          self.config.align.beta)
        return StepLoss(loss, int((labels != -100).sum()), preference_metrics(chosen, rejected))


class SimPO(PairwiseObjective):
    """Reference-free: nothing but the policy is in memory."""

    def loss(self, engine, batch) -> StepLoss:
        ids, labels = (t.to(engine.device) for t in batch)
        logp, lengths = sequence_logprobs(engine(input_ids=ids).logits, labels)
        half = len(ids) // 2
        loss, chosen, rejected = simpo_loss(logp[:half], logp[half:], lengths[:half], lengths[half:],
                                            self.config.align.beta, self.config.align.simpo_gamma)
        return StepLoss(loss, int((labels != -100).sum()), preference_metrics(chosen, rejected))
