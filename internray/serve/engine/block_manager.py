"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, reference counts, and the
prefix cache.

A full block is named by a hash chained over every token up to its end, so two prompts that share
a prefix share that prefix's blocks (reference-counted). A block joins the prefix cache once its
keys/values are computed, and a freed block keeps its hash and contents until it is reused, so a
later request with the same prefix still hits it: the prefix cache is a property of the allocator,
not a separate store (nano-vllm's design).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from internray.serve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # chain hash, set once the block's tokens are computed
    token_ids: list[int] = field(default_factory=list)


def chain_hash(prefix_hash: int | None, token_ids: list[int]) -> int:
    return hash((prefix_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # insertion-ordered, so the least recently freed block is reused first (LRU for the prefix
        # cache) and a cache hit takes its block out of the free list in O(1)
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.hit_blocks = self.queried_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Whether all of `seq`'s blocks can be taken and still leave `reserve` free."""
        return self.blocks_needed(seq.num_tokens) + reserve <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of `seq`'s tokens, sharing cached blocks for its longest cached prefix."""
        assert not seq.block_table, "sequence already holds blocks"
        # a cached prefix is never recomputed, so it would have no logits to score the prompt with
        prefix_hash, hitting = None, self.enable_prefix_caching and seq.params.prompt_logprobs is None
        for i in range(self.blocks_needed(seq.num_tokens)):
            tokens = seq.block_tokens(i, self.block_size)
            block_id = None
            if hitting and len(tokens) == self.block_size:
                prefix_hash = chain_hash(prefix_hash, tokens)
                self.queried_blocks += 1
                block_id = self.cached.get(prefix_hash)
                if block_id is not None and self.blocks[block_id].token_ids != tokens:
                    block_id = None  # a hash collision, not a hit
            if block_id is None:
                hitting = False
                seq.block_table.append(self._take_free())
            else:
                self.hit_blocks += 1
                self._share(block_id)
                seq.block_table.append(block_id)
                seq.num_cached_tokens += self.block_size
        # The last token is always computed: its logits give the next token.
        seq.num_computed_tokens = min(seq.num_cached_tokens, seq.num_tokens - 1)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in `seq` (decode crossing into a new block)."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_free())

    def publish_computed(self, seq: Sequence) -> None:
        """Enter `seq`'s blocks whose tokens are all computed into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        start = seq.num_published_blocks  # blocks before it are already in the cache
        prefix_hash = self.blocks[seq.block_table[start - 1]].hash if start else None
        for i in range(start, seq.num_computed_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = seq.block_tokens(i, self.block_size)
                block.hash, block.token_ids = chain_hash(prefix_hash, tokens), tokens
                self.cached.setdefault(block.hash, block.block_id)
            prefix_hash = block.hash
            seq.num_published_blocks = i + 1

    def free(self, seq: Sequence) -> None:
        """Return `seq`'s blocks; cached ones stay findable until their block is reused."""
        for block_id in reversed(seq.block_table):  # tail first: a prefix's head is reused last
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_published_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their keys/values came from weights that were replaced)."""
        if self.num_free != self.num_blocks:
            raise RuntimeError("cannot reset the prefix cache while sequences hold blocks")
        for block in self.blocks:
            block.hash, block.token_ids = None, []
        self.cached.clear()

    def _take_free(self) -> int:
        block = self.blocks[self.free_ids.popitem(last=False)[0]]
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]  # its contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, [], 1
        return block.block_id

    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1
