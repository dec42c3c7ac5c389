"""The align stage's job config: the train stage's sections plus an `align` section.

One config covers the four methods, since they share the model, optimizer, scaling and
checkpoint sections with training; `align.method` picks the objective and `align.data` the
JSONL it reads (preference pairs, or prompts with answers for GRPO).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from internray.config import ExistingPath, Section
from internray.train.config import LoraSection, ModelSection, TrainConfig


class RLSection(Section):
    """Online RL (GRPO, PPO): rollouts from internray's engine in Ray actors, a rule or model reward."""

    group_size: int = Field(8, ge=1)
    """Completions sampled per prompt (GRPO normalizes rewards within the group, so it needs >= 2)."""
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    kl_coef: float = Field(0.04, ge=0)
    """Weight of the KL penalty against the reference (the starting policy): GRPO's k3 term in the
    loss; PPO's per-token reward -kl_coef * (log pi - log pi_ref)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """PPO: discount over response tokens."""
    lam: float = Field(0.95, ge=0, le=1)
    """PPO: GAE's lambda."""
    value_coef: float = Field(0.1, ge=0)
    """PPO: weight of the value head's loss."""
    reward: Literal["contains", "exact", "last_number", "model"] = "contains"
    """A rule comparing the completion with the prompt's `answer`, or `model` (`reward_model`)."""
    reward_model: ExistingPath | None = None
    """An HF sequence-classification checkpoint (an align run with method=reward) for reward=model."""
    rollout_workers: int = Field(1, ge=1)
    rollout_cpus: float = Field(0.5, gt=0)
    rollout_gpus: float = Field(0.0, ge=0)
    rollout_threads: int | None = Field(None, ge=1)
    """torch threads per rollout actor on CPU; default: int(rollout_cpus). Training workers wait
    during rollouts, so more threads than reserved CPUs can pay off on a small machine."""
    rollout_backend: Literal["engine", "hf"] = "engine"
    """`engine`: internray's paged, continuously batched engine; `hf`: transformers' `generate` (the baseline)."""
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """For both backends; `auto` is the serve engine's rule: bf16 on GPUs and on CPUs with bf16
    instructions, fp32 elsewhere."""
    kv_cache_gib: float = Field(0.5, gt=0)
    verify_weights: bool = False
    """After each refresh, compare a rollout actor's log-probabilities of a probe sequence with the
    trained policy's (metric `rollout_logprob_diff`); costs one extra forward per step."""

    @model_validator(mode="after")
    def _reward_model_given(self):
        if (self.reward == "model") != (self.reward_model is not None):
            raise ValueError("set rl.reward=model together with rl.reward_model (and only then)")
        return self


class AlignSection(Section):
    method: Literal["reward", "dpo", "simpo", "grpo", "ppo"]
    data: ExistingPath
    """JSONL: `prompt`/`chosen`/`rejected` records (reward, dpo, simpo), `prompt`/`answer` (grpo, ppo)."""
    max_len: int = Field(1024, ge=8)
    """Prompt + response tokens; longer pairs are truncated from the response's end."""
    tuning: Literal["full", "lora"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    beta: float = Field(0.1, gt=0)
    """DPO's KL strength; SimPO's reward scale."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin."""
    rl: RLSection = Field(default_factory=RLSection)


class AlignModelSection(ModelSection):
    preset: str | None = None

    @model_validator(mode="after")
    def _one_source(self):  # replaces ModelSection's: alignment never starts from a random preset
        if self.path is None or self.preset is not None:
            raise ValueError("alignment starts from a checkpoint: set model.path (an HF directory), not model.preset")
        return self


class AlignConfig(TrainConfig):
    model: AlignModelSection = Field(default_factory=AlignModelSection)
    align: AlignSection

    def tuning(self):
        return self.align.tuning, self.align.lora

    def has_own_data(self) -> bool:
        return True

    @model_validator(mode="after")
    def _aligns_a_checkpoint(self):
        if self.finetune is not None:
            raise ValueError("an align job has no `finetune` section (its data is align.data)")
        if self.align.method in ("grpo", "ppo") and self.scaling.zero_stage == 3:
            raise ValueError(f"align.method={self.align.method} gathers the policy on rank 0 after each step: "
                             "use zero_stage <= 2")
        if self.align.method == "grpo" and self.align.rl.group_size < 2:
            raise ValueError("align.method=grpo compares completions within a group: set align.rl.group_size >= 2")
        return self
