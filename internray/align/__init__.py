"""Alignment: reward models, DPO/SimPO and GRPO, on the train stage's loop and the serve engine."""
