"""Tokenizer training, and tokenize + pack into fixed-length training sequences.

Packing concatenates documents (each followed by EOS) and cuts the stream every `seq_len`
tokens; `doc_lens` records the segment lengths inside each sequence so training can reset
positions or mask attention at document boundaries. A document is never dropped or repeated by
packing: only the last sequence of each pack group may be shorter than `seq_len`, and
`num_tokens` says how long each row is. Mixing weights repeat or subsample documents, and
documents are assigned to pack groups, deterministically by id hash.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from internray.models.export import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
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
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
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


TOKENIZED_SCHEMA = pa.schema([("seq", pa.int64()), ("copy", pa.int32()), ("group", pa.int64()),
                              ("ids", pa.list_(pa.int32()))])


class Tokenize:
    """Ray Data UDF (actor): loads the tokenizer once; one row per document copy of this split.

    Each copy is assigned a pack group by hash, so which documents are packed together does not
    depend on how Ray happened to batch them: the same config gives the same shards.
    """

    def __init__(self, tokenizer_dir: str, weights: dict[str, float], split: str, validation_fraction: float,
                 groups: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.weights, self.split, self.validation_fraction, self.groups = weights, split, validation_fraction, groups

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [(seq, doc_id, text, copy)
                for seq, doc_id, text, source in zip(*(batch.column(c).to_pylist() for c in ("seq", "id", "text", "source")))
                if split_of(doc_id, self.validation_fraction) == self.split
                for copy in range(repeats(doc_id, self.weights.get(source, 1.0)))]
        if not rows:
            return TOKENIZED_SCHEMA.empty_table()
        encoded = self.tokenizer([r[2] for r in rows], add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return pa.table({
            "seq": [r[0] for r in rows],
            "copy": [r[3] for r in rows],
            "group": [int(unit_hash(f"{r[1]}#{r[3]}", "pack") * self.groups) for r in rows],
            "ids": [ids + [eos] for ids in encoded],
        }, schema=TOKENIZED_SCHEMA)


def pack_group(table: pa.Table, seq_len: int) -> pa.Table:
    """Ray Data map_groups UDF: pack one group's documents in input order."""
    table = table.sort_by([("seq", "ascending"), ("copy", "ascending")])
    return pack(table.column("ids").to_pylist(), seq_len)


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
