"""Grammar-constrained decoding: a per-sequence token mask from llguidance.

Why llguidance: of the three CPU grammar engines on PyPI it is the one with no dependencies
(xgrammar pulls in triton and a TVM runtime; outlines-core precomputes a regex index over the
whole vocabulary per schema, which is slow for nested schemas), it compiles JSON Schema and Lark
(with inline `%json`) grammars in milliseconds, and computes a mask in microseconds per token
(lazily, over a token trie), which keeps constrained and free sequences in one batch cheap.

A request's `Guide` (sampling_params.py) is compiled once when the request is added; each
sequence then owns a matcher that the sampler asks for a mask and the engine advances by the
sampled token. A guide with a `trigger` (e.g. `<tool_call>`, for "auto" tool choice) gets its
matcher only once the sequence's text reaches the trigger.
"""
from __future__ import annotations

import numpy as np
import torch

from internray.serve.engine.sampling_params import Guide, InvalidRequest


JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON as `json.dumps` writes it (what models saw in training), with no room for the endless
whitespace a weak model otherwise pads with. Lark grammars get it per `%json` via `x-guidance`."""


class GuideCompiler:
    """Per engine: the tokenizer view llguidance needs (built once), and matchers per sequence."""

    def __init__(self, hf_tokenizer, vocab_size: int):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)

    def grammar(self, guide: Guide) -> str:
        LLMatcher = self._ll.LLMatcher
        if guide.kind == "json_schema":
            try:
                grammar = LLMatcher.grammar_from_json_schema(guide.spec, defaults=JSON_STYLE)
            except ValueError as e:
                raise InvalidRequest(f"invalid JSON schema: {e}", guide.param) from e
        elif guide.kind == "lark":
            grammar = LLMatcher.grammar_from_lark(guide.spec)
        else:
            grammar = LLMatcher.grammar_from_regex(guide.spec)
        problem = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise InvalidRequest(f"invalid {guide.kind.replace('_', ' ')}: {problem}", guide.param)
        return grammar

    def matcher(self, grammar: str, prefix_text: str = ""):
        """A fresh matcher, advanced over `prefix_text` already generated (None if it does not fit)."""
        matcher = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if prefix_text and not matcher.consume_tokens(self.tokenizer.tokenize_str(prefix_text)):
            return None
        return matcher

    def allowed(self, matcher) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar allows next (EOS only once it is complete)."""
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:self.vocab_size].astype(bool))
