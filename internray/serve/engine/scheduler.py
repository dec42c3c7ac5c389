"""Which sequences run this step, and how many of their tokens.

Continuous batching with chunked prefill: every step has a token budget. Running sequences go
first (a decoding one needs one token, a half-prefilled one its next chunk), then waiting ones are
admitted while the budget, the sequence cap and the free KV blocks allow. A prompt longer than the
remaining budget is prefilled over several steps, so a long prompt never stalls the decodes.
When a decoding sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it waits to be recomputed (prefix caching makes that cheap).
Admission knows what a sequence costs: all of its prompt's blocks, taken up front (a long
prompt is prefilled over many steps, but its blocks are spoken for from the start), plus one block
of headroom per running sequence. Without the headroom a long prompt could take the last free
blocks, and the next decode step would have to preempt (and later recompute) someone; with it, a
long request waits until it fits and everything admitted keeps decoding. The price is a waiting
queue, reported as such.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from internray.serve.engine.block_manager import BlockManager
from internray.serve.engine.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so its logits give a new token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens

    @property
    def prompt_logprob_rows(self) -> int:
        """Leading positions of this chunk whose logits score the prompt's next token, when the
        request asked for prompt logprobs (their logits are kept; otherwise only the last one's)."""
        if self.seq.params.prompt_logprobs is None:
            return 0
        begin = self.seq.num_computed_tokens
        return max(0, min(begin + self.num_tokens, self.seq.num_prompt_tokens - 1) - begin)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):  # oldest first
            if seq.status is not Status.RUNNING or budget == 0:
                continue  # preempted while making room for an older sequence
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n):
                continue  # preempted itself
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq, reserve=len(self.running)):
                break  # it costs more than is free once every running sequence keeps a block to grow into
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return chunks

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq` to `num_tokens`, preempting the newest other sequences if blocks run out."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that stopped (or was aborted) wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
