"""`internray align CONFIG`: reward model, DPO, SimPO, GRPO or PPO training of a checkpoint.

The driver tokenizes `align.data` into the run directory (bad records aside, with the reason),
builds the objective, and hands it to the train stage's `fit`: the same Ray Train + DeepSpeed
loop, checkpoints, resume and HF export as pretraining and finetuning. GRPO and PPO first start their
rollout actors (their own placement group) and stop them when training ends.
"""
from __future__ import annotations

from internray.align.config import AlignConfig
from internray.align.data import prepare
from internray.runs import Run
from internray.train.pretrain import fit, load_tokenizer, open_stage_run


def run_align(config: AlignConfig) -> Run:
    align = config.align
    run = open_stage_run("align", config)
    online = align.method in ("grpo", "ppo")
    run.add_input(align.data, role="prompts" if online else "preference_data")
    if online and align.rl.reward_model is not None:
        run.add_input(align.rl.reward_model, role="reward_model")
    tokenizer = load_tokenizer(config)
    if tokenizer.chat_template is None:
        from internray.models.export import DEFAULT_CHAT_TEMPLATE

        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = run.path("align_data", "train.parquet")
    counts = prepare(align.data, align.method, tokenizer, align.max_len, train, run.path("align_rejects.jsonl"))
    run.update(counts=counts)
    config.data.train = train.parent
    if not online:
        from internray.align.pairwise import DPO, RewardModeling, SimPO

        objective = {"reward": lambda: RewardModeling(config, pad_id), "dpo": lambda: DPO(config),
                     "simpo": lambda: SimPO(config)}[align.method]()
        return fit(objective, run, tokenizer)
    from internray.align.ppo import PPO
    from internray.align.rl import GRPO
    from internray.align.rollout import RolloutPool

    pool = RolloutPool(run.run_id, str(config.model.path), align.rl)
    try:
        return fit({"grpo": GRPO, "ppo": PPO}[align.method](config, pool, pad_id), run, tokenizer)
    finally:
        pool.shutdown()
