"""The alignment losses, as plain functions of log-probabilities and rewards.

Conventions: `labels` are the input ids with IGNORE (-100) wherever the token is not part of the
response being scored; logits at position t predict the token at t + 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) [batch, T-1] (0 where ignored) and the mask of scored tokens."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE
    logp = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's response, and its length in tokens."""
    logp, mask = token_logprobs(logits, labels)
    return logp.sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).
    Returns the loss and the implicit rewards beta * log(pi / pi_ref) of both sides."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward).mean(), chosen_reward.detach(), rejected_reward.detach()


def simpo_loss(policy_chosen, policy_rejected, chosen_len, rejected_len, beta: float, gamma: float):
    """SimPO (Meng et al. 2024), reference-free: the reward is the length-normalized log-probability
    beta * log pi / |y|, and the chosen side must win by a margin gamma."""
    chosen_reward = beta * policy_chosen / chosen_len.clamp(min=1)
    rejected_reward = beta * policy_rejected / rejected_len.clamp(min=1)
    return -F.logsigmoid(chosen_reward - rejected_reward - gamma).mean(), chosen_reward.detach(), rejected_reward.detach()


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected) (InstructGPT's reward model loss)."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each completion's reward standardized within its prompt's group,
    so no value model is needed. A group whose rewards are all equal gets zero advantages."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def kl_k3(logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(r) - r - 1 with r = log pi_ref - log pi (Schulman's
    k3: unbiased, always >= 0), as GRPO uses it."""
    ratio = reference_logp - logp
    return torch.exp(ratio) - ratio - 1


def grpo_loss(logp, reference_logp, mask, advantages, kl_coef: float):
    """The GRPO objective for one update per rollout batch: the policy-gradient term
    exp(logp - logp.detach()) * A (value 1, gradient A * grad logp, the clipped ratio of PPO being
    exactly 1 on fresh samples), minus kl_coef * KL, averaged over each sequence's tokens, then
    over sequences. Returns the loss, the policy-gradient part and the mean KL."""
    ratio = torch.exp(logp - logp.detach())
    kl = kl_k3(logp, reference_logp)
    per_token = -(ratio * advantages[:, None]) + kl_coef * kl
    lengths = mask.sum(-1).clamp(min=1)
    loss = ((per_token * mask).sum(-1) / lengths).mean()
    policy = (-(ratio * advantages[:, None]) * mask).sum(-1) / lengths
    mean_kl = (kl * mask).sum(-1) / lengths
    return loss, policy.mean().detach(), mean_kl.mean().detach()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016) over each row's response tokens.

    rewards, values, mask: [batch, T]; a row's response is one contiguous run of masked positions
    and the state after its last token is terminal (value 0). Returns (advantages, returns), zero
    outside the mask: A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t.
    """
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        inside = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(inside, advantage, 0.0)
        next_value = torch.where(inside, values[:, t], next_value)
        next_advantage = torch.where(inside, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Standardize over the masked entries of the whole batch (PPO's advantage normalization)."""
    mean = (values * mask).sum() / mask.sum().clamp(min=1)
    var = (((values - mean) * mask) ** 2).sum() / mask.sum().clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def ppo_loss(logp, values, advantages, returns, mask, value_coef: float):
    """PPO's clipped surrogate and value loss for one update per rollout batch: the ratio
    exp(logp - logp_old) is 1 with gradient grad logp, and the new values equal the old, so both
    clips are inactive and drop out. Token means over the batch. Returns (loss, policy part,
    value part)."""
    ratio = torch.exp(logp - logp.detach())
    tokens = mask.sum().clamp(min=1)
    policy = (-(ratio * advantages) * mask).sum() / tokens
    value = (0.5 * (values - returns) ** 2 * mask).sum() / tokens
    return policy + value_coef * value, policy.detach(), value.detach()
