"""A completion's text, extended token by token by decoding a few tokens, not the whole completion.

Decoding the whole completion again after every token (what the engine did first) costs O(n) per
step, O(n^2) per request: for 64 sequences of SmolLM2's tokenizer, 2 ms a step at 128 tokens, 18 ms
at 1,024 and 42 ms at 2,048, where the model's decode step takes ~90 ms; this takes 0.4-0.8 ms
(`benchmarks/detokenize.py`; what still grows is copying the token list, not decoding it). It is vLLM's incremental detokenization: decode a short window of
the latest tokens, and append what the newest ones add to the window's text. The window starts one
emitted chunk back, so tokenizers whose decoded text depends on the token before (SentencePiece's
leading spaces, byte-level pieces of one UTF-8 character) get the same text as a full decode. Text
ending in a partial UTF-8 character is held back until the character completes, or until the
final step, which gives what a full decode gives (tests/test_serve_engine.py compares the two).
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.prefix_offset = 0  # the window's first token
        self.read_offset = 0  # tokens before this are in the text already

    def step(self, ids: list[int], final: bool = False) -> str:
        """The text that `ids` (the completion so far) adds to what earlier calls returned; `final`
        also releases a trailing partial character."""
        known = self._decode(ids[self.prefix_offset:self.read_offset])
        window = self._decode(ids[self.prefix_offset:])
        if not final and (len(window) <= len(known) or window.endswith("\ufffd")):
            return ""  # nothing new yet (a skipped special token), or half a character
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return window[len(known):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
