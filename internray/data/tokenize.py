"""Tokenizer training, and tokenize + pack into fixed-length training sequences.

Packing concatenates documents (each followed by EOS) and cuts the stream every `seq_len`
tokens; `doc_lens` records the segment lengths inside each sequence so training can reset
positions or mask attention at document boundaries. A document is never dropped or repeated by
packing: only the last sequence of each batch may be shorter than `seq_len`, and
`num_tokens` says how long each row is. Mixing weights repeat or subsample documents
deterministically (by id hash) before packing.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import pyarrow as pa

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("doc_lens", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
])


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, out: Path) -> None:
    """Byte-level BPE (GPT-2 style, so any UTF-8 text round-trips), saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def split_of(doc_id: str, validation_fraction: float) -> str:
    return "validation" if unit_hash(doc_id, "split") < validation_fraction else "train"


def repeats(doc_id: str, weight: float) -> int:
    """How many copies of a document a source weight asks for (0.5: half of them, 2.0: twice)."""
    whole = int(weight)
    return whole + int(unit_hash(doc_id, "weight") < weight - whole)


def unit_hash(doc_id: str, salt: str) -> float:
    """A deterministic number in [0, 1) per (document, purpose): stable sampling without state."""
    digest = hashlib.blake2b(f"{salt}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class TokenizeAndPack:
    """Ray Data UDF (actor): loads the tokenizer once, packs each batch of documents."""

    def __init__(self, tokenizer_dir: str, seq_len: int, weights: dict[str, float], split: str,
                 validation_fraction: float):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.eos = self.tokenizer.eos_token_id
        self.seq_len, self.weights = seq_len, weights
        self.split, self.validation_fraction = split, validation_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, ids, sources = (batch.column(c).to_pylist() for c in ("text", "id", "source"))
        copies = [repeats(i, self.weights.get(s, 1.0)) if split_of(i, self.validation_fraction) == self.split else 0
                  for i, s in zip(ids, sources)]
        kept = [t for t, c in zip(texts, copies) for _ in range(c)]
        if not kept:
            return PACKED_SCHEMA.empty_table()
        encoded = self.tokenizer(kept, add_special_tokens=False)["input_ids"]
        return pack([doc + [self.eos] for doc in encoded], self.seq_len)


def pack(docs: list[list[int]], seq_len: int) -> pa.Table:
    """Concatenate docs and cut every seq_len tokens, recording document segment lengths."""
    rows, current, lens = [], [], []
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(seq_len - len(current), len(doc) - start)
            current.extend(doc[start : start + take])
            lens.append(take)
            start += take
            if len(current) == seq_len:
                rows.append((current, lens))
                current, lens = [], []
    if current:
        rows.append((current, lens))
    return pa.table({
        "input_ids": [r[0] for r in rows],
        "doc_lens": [r[1] for r in rows],
        "num_tokens": [len(r[0]) for r in rows],
    }, schema=PACKED_SCHEMA)
