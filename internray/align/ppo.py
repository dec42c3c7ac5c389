"""PPO with GAE: a value head on the policy, token-level KL rewards, advantages from GAE.

The critic is a linear value head on the policy's last hidden state (a shared trunk, as in
`trl`'s AutoModelForCausalLMWithValueHead), so policy and critic train together in the one
DeepSpeed engine; the export is the policy alone (the value head stays in the DeepSpeed
checkpoint, which is what a resumed run needs). Each response token's reward is
-kl_coef * (log pi - log pi_ref), and the scalar reward (rule or reward model) is added at the
response's last token, as InstructGPT does.
"""
from __future__ import annotations

import torch
from torch import nn

from internray.align.losses import gae, masked_whiten, ppo_loss, token_logprobs
from internray.align.rl import OnlineRL
from internray.train.objective import StepLoss


class ValueHeadModel(nn.Module):
    """The causal LM plus a scalar head: forward returns (logits, values per position)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(input_ids=input_ids, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1).float()

    def gradient_checkpointing_enable(self) -> None:
        self.policy.gradient_checkpointing_enable()


class PPO(OnlineRL):
    def build_model(self, vocab_size: int, quantize: bool = True) -> nn.Module:
        return ValueHeadModel(super().build_model(vocab_size, quantize))

    def policy(self, module: nn.Module) -> nn.Module:
        return module.policy

    def exported(self, model: nn.Module) -> nn.Module:
        return model.policy

    def loss(self, engine, batch) -> StepLoss:
        rl = self.config.align.rl
        rollout = self.rollout(engine, batch)
        logits, values = engine(input_ids=rollout.ids)
        logp, mask = token_logprobs(logits, rollout.labels)
        values = values[:, :-1]  # the value of the state each log-probability's token is chosen in
        with torch.no_grad():
            reference, _ = token_logprobs(self.reference_logits(engine, rollout.ids), rollout.labels)
            kl = (logp - reference) * mask
            rewards = -rl.kl_coef * kl
            last = mask.cumsum(-1).argmax(-1)  # each row's last response position
            rewards[torch.arange(len(rewards)), last] += rollout.rewards.to(rewards.device) * mask.any(-1)
            advantages, returns = gae(rewards, values.detach(), mask, rl.gamma, rl.lam)
            advantages = masked_whiten(advantages, mask)
        loss, policy_loss, value_loss = ppo_loss(logp, values, advantages, returns, mask, rl.value_coef)
        tokens = mask.sum().clamp(min=1)
        return StepLoss(loss, int(mask.sum()), rollout.metrics() | {
            "kl": float(kl.sum() / tokens), "policy_loss": float(policy_loss), "value_loss": float(value_loss),
            "value_mean": float((values.detach() * mask).sum() / tokens)})
