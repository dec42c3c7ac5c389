"""Supervised finetuning data: conversations in three formats, rendered with the model's chat
template, with the loss only on what the assistant says.

Formats (XTuner's): alpaca (`instruction`, `input`, `output`), sharegpt (`conversations` of
`from`/`value`), OpenAI messages (`messages` of `role`/`content`); `text` rows are raw text for
incremental pretraining (loss on every token). Each message is tokenized as its own segment of
the rendered conversation: the segment is the difference between the template applied to the
conversation up to and including the message and up to just before it (for an assistant
message: before it plus the generation prompt), so the assistant header stays masked and the
reply and its end-of-turn token are learned.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

SFT_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SFTFormatError(ValueError):
    """A record that is not a conversation in the configured format."""


def to_messages(record: dict, fmt: str) -> list[dict] | str:
    """One record as OpenAI-style messages, or as plain text for the `text` format."""
    if fmt == "auto":
        fmt = next((f for f, key in (("openai", "messages"), ("sharegpt", "conversations"),
                                      ("alpaca", "instruction"), ("text", "text")) if key in record), None)
        if fmt is None:
            raise SFTFormatError(f"cannot tell the format of a record with keys {sorted(record)}")
    if fmt == "text":
        return _field(record, "text", str)
    if fmt == "alpaca":
        prompt = _field(record, "instruction", str)
        if record.get("input"):
            prompt += "\n\n" + record["input"]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _field(record, "output", str)}]
        return ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + messages
    if fmt == "sharegpt":
        turns = _field(record, "conversations", list)
        try:
            return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
        except (KeyError, TypeError) as err:
            raise SFTFormatError(f"sharegpt turn without a known `from`/`value`: {err}") from None
    messages = _field(record, "messages", list)
    if not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise SFTFormatError("every message needs `role` and `content`")
    return messages


def _field(record: dict, key: str, kind: type):
    if not isinstance(record.get(key), kind):
        raise SFTFormatError(f"missing or non-{kind.__name__} field `{key}`")
    return record[key]


def tokenize_conversation(tokenizer, messages: list[dict] | str, max_len: int,
                          learn_from: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE everywhere but assistant replies (or all, for text);
    assistant messages before index `learn_from` count as context (a preference pair's prompt)."""
    if isinstance(messages, str):
        ids = tokenizer(messages, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids[:max_len], ids[:max_len]
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTFormatError("a conversation needs at least one assistant message to learn from")
    if messages[0]["role"] == "assistant":
        raise SFTFormatError("a conversation cannot open with the assistant")
    ids, labels, rendered = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            _append(tokenizer, header[len(rendered):], ids, labels, learn=False)
            rendered = header
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        _append(tokenizer, full[len(rendered):], ids, labels, learn=message["role"] == "assistant" and i >= learn_from)
        rendered = full
    return ids[:max_len], labels[:max_len]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _append(tokenizer, text: str, ids: list[int], labels: list[int], learn: bool) -> None:
    if not text:
        return
    piece = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids.extend(piece)
    labels.extend(piece if learn else [IGNORE] * len(piece))


def prepare_sft(source: Path, tokenizer, fmt: str, max_len: int, out: Path, rejects: Path) -> dict[str, int]:
    """Tokenize a JSONL file of conversations into Parquet rows (input_ids, labels)."""
    def row(record: dict) -> dict:
        ids, labels = tokenize_conversation(tokenizer, to_messages(record, fmt), max_len)
        return {"input_ids": ids, "labels": labels}

    records, rejected = tokenize_jsonl(source, row, SFT_SCHEMA, out, rejects, (SFTFormatError,), f"{fmt} records")
    return {"sft_records": records, "sft_rejected": rejected}


def tokenize_jsonl(source: Path, to_row, schema: pa.Schema, out: Path, rejects: Path,
                   errors: tuple[type[Exception], ...], what: str) -> tuple[int, int]:
    """`to_row(record)` for every JSONL record into one Parquet file; lines that are not JSON, or
    whose record raises one of `errors`, go to `rejects` with the line number and the reason.
    Returns (rows written, records rejected); no usable record at all is an error naming the first reason."""
    import pyarrow.parquet as pq

    rows, bad = [], []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append({"line": lineno, "reason": f"not valid JSON ({err})", "text": line[:500]})
                continue
            try:
                rows.append(to_row(record))
            except errors as err:
                bad.append({"line": lineno, "reason": str(err), "text": line[:500]})
    if not rows:
        first = bad[0]["reason"] if bad else "empty file"
        raise ValueError(f"{source}: no usable {what} ({len(bad)} rejected, first: {first})")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
    if bad:
        rejects.write_text("".join(json.dumps(b) + "\n" for b in bad))
    return len(rows), len(bad)
