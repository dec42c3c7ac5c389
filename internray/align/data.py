"""Alignment data: preference pairs and RL prompts, from JSONL to Parquet rows of token ids.

Pairs come as `{"prompt", "chosen", "rejected"}`, where the prompt is a string or a list of
messages (multi-turn) and each response a string or a list of assistant/tool messages, or as two
full conversations `{"chosen": [...], "rejected": [...]}` (HH-RLHF style) whose shared leading
messages are the prompt. Both sides are rendered with the model's chat template; only the final
response is learned (labels elsewhere are IGNORE), so DPO's and SimPO's sums and the reward
model's pooled token all measure the response. RL prompts (GRPO, PPO) are `{"prompt", "answer"}`, rendered
up to the assistant header. Records that cannot be used are written aside with the reason.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from internray.train.sft import IGNORE, SFTFormatError, tokenize_conversation, tokenize_jsonl

TOKENS = pa.list_(pa.int32())
PAIR_SCHEMA = pa.schema([("chosen_ids", TOKENS), ("chosen_labels", TOKENS),
                         ("rejected_ids", TOKENS), ("rejected_labels", TOKENS)])
PROMPT_SCHEMA = pa.schema([("prompt_ids", TOKENS), ("answer", pa.string())])


class AlignDataError(ValueError):
    """A record that is not a usable preference pair or prompt."""


def messages_of(value, role: str, field: str) -> list[dict]:
    """A string becomes one `role` message; a list must already be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        return value
    raise AlignDataError(f"`{field}` must be a string or a non-empty list of {{role, content}} messages")


def split_pair(record: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen reply messages, rejected reply messages)."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise AlignDataError("a preference record needs `chosen` and `rejected`")
    if "prompt" in record:
        prompt = messages_of(record["prompt"], "user", "prompt")
        chosen = messages_of(record["chosen"], "assistant", "chosen")
        rejected = messages_of(record["rejected"], "assistant", "rejected")
    else:  # two whole conversations: the prompt is what they share
        full_c = messages_of(record["chosen"], "user", "chosen")
        full_r = messages_of(record["rejected"], "user", "rejected")
        shared = 0
        while shared < min(len(full_c), len(full_r)) - 1 and full_c[shared] == full_r[shared]:
            shared += 1
        prompt, chosen, rejected = full_c[:shared], full_c[shared:], full_r[shared:]
    if not prompt or prompt[-1]["role"] == "assistant":
        raise AlignDataError("the prompt must end with a user (or tool) message")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[0]["role"] != "assistant":
            raise AlignDataError(f"the {name} response must start with an assistant message")
    if chosen == rejected:
        raise AlignDataError("`chosen` and `rejected` are the same response")
    return prompt, chosen, rejected


def tokenize_pair(tokenizer, record: dict, max_len: int) -> dict:
    prompt, chosen, rejected = split_pair(record)
    row = {}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = tokenize_conversation(tokenizer, prompt + reply, max_len, learn_from=len(prompt))
        if all(label == IGNORE for label in labels):
            raise AlignDataError(f"the prompt fills max_len={max_len}: no {name} response token is left")
        row[f"{name}_ids"], row[f"{name}_labels"] = ids, labels
    return row


def tokenize_prompt(tokenizer, record: dict, max_len: int) -> dict:
    if not isinstance(record, dict) or "prompt" not in record or "answer" not in record:
        raise AlignDataError("an RL prompt record needs `prompt` and `answer`")
    if not isinstance(record["answer"], (str, int, float)) or isinstance(record["answer"], bool):
        raise AlignDataError("`answer` must be a string or a number")
    messages = messages_of(record["prompt"], "user", "prompt")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) >= max_len:
        raise AlignDataError(f"the prompt has {len(ids)} tokens; max_len={max_len} leaves no room for a response")
    return {"prompt_ids": ids, "answer": str(record["answer"])}


def prepare(source: Path, method: str, tokenizer, max_len: int, out: Path, rejects: Path) -> dict[str, int]:
    """Tokenize `source` into `out` (Parquet) for `method`; bad records go to `rejects` with the reason."""
    tokenize, schema = (tokenize_prompt, PROMPT_SCHEMA) if method in ("grpo", "ppo") else (tokenize_pair, PAIR_SCHEMA)
    records, rejected = tokenize_jsonl(source, lambda record: tokenize(tokenizer, record, max_len), schema, out, rejects,
                                       (AlignDataError, SFTFormatError), f"records for align.method={method}")
    return {"records": records, "rejected": rejected}
