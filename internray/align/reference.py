"""The reference policy: the starting model that DPO's log-ratios and RL's KL term compare against.

With LoRA the reference is the trained model itself with its adapters switched off, so no
second copy is held; with full tuning it is a frozen copy taken before DeepSpeed wraps the
policy, cast to the policy's precision so that the log-ratio starts at exactly zero.
"""
from __future__ import annotations

import copy

import torch


class ReferencePolicy:
    def __init__(self, policy: torch.nn.Module):
        self.frozen = None
        if not hasattr(policy, "disable_adapter"):
            self.frozen = copy.deepcopy(policy).eval().requires_grad_(False)

    def place_like(self, trained: torch.nn.Module, device: torch.device) -> None:
        """Match the trained module's device and dtype (DeepSpeed casts it to bf16)."""
        if self.frozen is not None:
            self.frozen.to(device=device, dtype=next(trained.parameters()).dtype)

    @torch.no_grad()
    def logits(self, policy: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The reference's logits for `ids`; `policy` is the trained (possibly LoRA) model."""
        if self.frozen is not None:
            return self.frozen(input_ids=ids).logits
        with policy.disable_adapter():
            return policy(input_ids=ids).logits
