"""The engine loop: `add_request`, then `step()` until done. Each step is schedule, run, postprocess.

`LLM` is the offline front (a list of prompts in, completions out); `async_engine` runs the same
loop on a thread for the server.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from internray.serve.config import EngineConfig
from internray.serve.engine.block_manager import BlockManager
from internray.serve.engine.detokenizer import IncrementalDetokenizer
from internray.serve.engine.guided import GuideCompiler
from internray.serve.engine.model_runner import ModelRunner, kv_cache_blocks, prepare_step
from internray.serve.engine.sampler import sample
from internray.serve.engine.sampling_params import InvalidRequest, SamplingParams
from internray.serve.engine.scheduler import Scheduler
from internray.serve.engine.sequence import Sequence
from internray.serve.metrics import EngineMetrics
from internray.serve.model.layers import TPInfo
from internray.serve.model.llama import context_limit


@dataclass
class RequestOutput:
    request_id: str
    text: str  # completion so far, cut at a stop string (streaming: see `stable_text`)
    stable_text: str  # the prefix of `text` that can no longer change
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] = field(default_factory=list)  # when asked; None for the first token


class LLMEngine:
    def __init__(self, config: EngineConfig, cpus_per_rank: float = 1.0, gpus_per_rank: float = 0.0, verbose: bool = True):
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        hf_config = AutoConfig.from_pretrained(config.model)
        self.vocab_size = hf_config.vocab_size
        self.eos_ids = set(_as_list(hf_config.eos_token_id)) | ({self.tokenizer.eos_token_id} - {None})
        num_blocks = kv_cache_blocks(config, hf_config)
        capacity = num_blocks * config.block_size
        limit = context_limit(hf_config)
        if config.max_model_len and config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds this checkpoint's context of {limit} "
                             "tokens (max_position_embeddings, x factor for dynamic NTK RoPE): positions past it were "
                             "never trained; declare rope_parameters scaling in config.json to extend it")
        self.max_model_len = min(config.max_model_len or limit, capacity)
        if self.max_model_len < 2:
            raise ValueError(f"kv_cache_gib={config.kv_cache_gib} buys {num_blocks} blocks: not even one sequence fits")
        if config.tensor_parallel_size == 1:
            self.runner = ModelRunner(config, TPInfo(), num_blocks)
        else:
            from internray.serve.engine.tp_workers import TensorParallelGroup
            self.runner = TensorParallelGroup(config, num_blocks, cpus_per_rank, gpus_per_rank)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.sequences: dict[str, Sequence] = {}
        self.guides = GuideCompiler(self.tokenizer, self.vocab_size)
        self.metrics = EngineMetrics(config.served_name or Path(config.model).name)
        if verbose:
            print(f"[internray serve] {config.model}: KV cache {num_blocks} blocks x {config.block_size} tokens = "
                  f"{capacity:,} tokens ({config.kv_cache_gib:g} GiB per rank); max_model_len {self.max_model_len:,}; "
                  f"{capacity // self.max_model_len} full-length sequences fit at once"
                  + (f"; {self.runner.describe()}" if config.tensor_parallel_size > 1 else ""),
                  flush=True)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        if request_id in self.sequences:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        if not all(0 <= t < self.vocab_size for t in prompt_token_ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.vocab_size})", "prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                                 f"{self.max_model_len} tokens, which must also hold at least one completion token",
                                 "messages")
        seq = Sequence(list(prompt_token_ids), params, request_id)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        if params.guide is not None:
            seq.grammar = self.guides.grammar(params.guide)  # a bad schema is refused here
            if params.guide.trigger is None:
                seq.matcher = self.guides.matcher(seq.grammar)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Free a request's sequence and KV blocks now (a client went away)."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq)
            seq.finish("abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        logits = self.runner.execute(prepare_step(chunks, self.config.block_size))
        row, sample_rows = 0, []
        for chunk in chunks:  # rows in prepare_step's order
            if chunk.prompt_logprob_rows:
                score_prompt(chunk, logits[row:row + chunk.prompt_logprob_rows])
                row += chunk.prompt_logprob_rows
            if chunk.samples:
                sample_rows.append(row)
                row += 1
        if row != len(sample_rows):
            logits = logits[sample_rows]
        sampling = [c.seq for c in chunks if c.samples]
        allowed = {i: self.guides.allowed(s.matcher) for i, s in enumerate(sampling) if s.matcher is not None}
        tokens, logprobs = sample(logits, sampling, allowed)
        return self.postprocess(chunks, dict(zip((s.seq_id for s in sampling), zip(tokens, logprobs))))

    def postprocess(self, chunks, sampled: dict[int, tuple[int, dict | None]]) -> list[RequestOutput]:
        now, outputs = time.monotonic(), []
        for chunk in chunks:
            seq = chunk.seq
            begin = seq.num_computed_tokens
            self.metrics.prompt_tokens.inc(max(0, min(begin + chunk.num_tokens, seq.num_prompt_tokens) - begin))
            seq.num_computed_tokens += chunk.num_tokens
            self.blocks.publish_computed(seq)
            if seq.seq_id not in sampled:
                continue  # a prefill chunk that has not reached the prompt's end
            token, logprob = sampled[seq.seq_id]
            seq.token_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            self.metrics.generation_tokens.inc()
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.metrics.ttft.observe(now - seq.arrival_time)
            else:
                self.metrics.tpot.observe(now - seq.last_token_time)
            seq.last_token_time = now
            self._check_stop(seq, token)
            outputs.append(self.output(seq))
            if seq.is_finished:
                self.metrics.requests.inc()
                self.scheduler.finish(seq)
                self.sequences.pop(seq.request_id, None)
        return outputs

    def _advance_guide(self, seq: Sequence, token: int) -> None:
        """Feed the sampled token to the sequence's matcher, or start the matcher at its trigger."""
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        elif seq.grammar is not None and seq.params.guide.trigger in seq.text:
            after = seq.text[seq.text.index(seq.params.guide.trigger) + len(seq.params.guide.trigger):]
            seq.matcher = self.guides.matcher(seq.grammar, after)
            seq.grammar = None  # one trigger per sequence; None above also means "did not fit"

    def _check_stop(self, seq: Sequence, token: int) -> None:
        """Extend the text by the new token's, then finish the sequence if it stops: at a stop
        string (cut before it), a stop or EOS token, a completed grammar, or its length limit."""
        p = seq.params
        ids = seq.completion_token_ids
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]  # the end-of-sequence token is not text, even where special tokens are kept
        searched = len(seq.text)  # no stop string ends in the text before
        seq.text += seq.detokenizer.step(ids)
        self._advance_guide(seq, token)
        reason = None
        if ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
                or (seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()))):
            reason = "stop"  # a completed grammar included: only EOS could follow
        elif seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            seq.text += seq.detokenizer.step(ids, final=True)
        hits = [i for i in (seq.text.find(s, max(0, searched - len(s) + 1)) for s in p.stop) if i >= 0]
        if hits:
            seq.text, reason = seq.text[:min(hits)], "stop"
        if reason:
            seq.finish(reason)

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.text, stable_text(seq), seq.completion_token_ids, seq.is_finished,
                             seq.finish_reason, seq.num_prompt_tokens, seq.num_cached_tokens, seq.logprobs,
                             seq.prompt_logprobs)

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights (HF tensor names) between batches, dropping the prefix
        cache computed with the old ones; the align stage's rollouts call this after each update."""
        if self.has_work:
            raise RuntimeError("update_weights needs an idle engine (requests are still running)")
        self.runner.load_weights(weights)
        self.blocks.reset_prefix_cache()

    def shutdown(self) -> None:
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()


def score_prompt(chunk, logits: torch.Tensor) -> None:
    """Log-probabilities of the prompt tokens that follow this chunk's leading positions. Entries are
    set by position, so a preempted sequence that recomputes its prompt writes the same values."""
    seq, begin = chunk.seq, chunk.seq.num_computed_tokens
    logprobs = logits.log_softmax(-1)
    targets = torch.tensor(seq.token_ids[begin + 1:begin + 1 + len(logits)])
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k = seq.params.prompt_logprobs
    top = logprobs.topk(k) if k else None
    for i, (token, logprob) in enumerate(zip(targets.tolist(), chosen)):
        seq.prompt_logprobs[begin + 1 + i] = {
            "token": token, "logprob": logprob,
            "top": [] if top is None else list(zip(top.indices[i].tolist(), top.values[i].tolist()))}


def stable_text(seq: Sequence) -> str:
    """The completion text a stream may send: all of it once finished; otherwise without anything
    that might still turn out to start a stop string (the detokenizer holds back partial characters)."""
    text = seq.text
    if seq.is_finished:
        return text
    hold = max((len(s) - 1 for s in seq.params.stop), default=0)
    return text[:len(text) - hold] if hold else text


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class LLM:
    """Offline generation: `LLM(EngineConfig(model=...)).generate(prompts, params)`."""

    def __init__(self, config: EngineConfig, **kwargs):
        self.engine = LLMEngine(config, **kwargs)

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        return generate(self.engine, prompts, params)


def generate(engine: LLMEngine, prompts: list[str] | list[list[int]],
             params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
    """Run `prompts` (text or token ids) to completion together; outputs in prompt order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids = prompt if isinstance(prompt, list) else engine.tokenizer(prompt)["input_ids"]
        engine.add_request(str(i), ids, p)
    finished: dict[str, RequestOutput] = {}
    while engine.has_work:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return [finished[str(i)] for i in range(len(prompts))]
