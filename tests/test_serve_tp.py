"""Tensor parallelism on this machine: two ranks (this process + one Ray actor) in a gloo group."""
from __future__ import annotations

from transformers import AutoTokenizer

from internray.serve.config import EngineConfig
from internray.serve.engine.llm_engine import LLMEngine, generate
from internray.serve.engine.sampling_params import SamplingParams


def test_tp2_gives_the_same_tokens_and_logprobs_as_tp1(ray_cluster, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [tokenizer(p)["input_ids"] for p in ("def f(x):\n    return", "import os\nimport sys\n" * 4, "x")]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1, ignore_eos=True)
    outputs = {}
    for tp in (1, 2):
        config = EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=tp, kv_cache_gib=0.01,
                              block_size=4, max_num_batched_tokens=16, threads_per_rank=1)
        engine = LLMEngine(config, cpus_per_rank=0.5, verbose=False)
        try:
            outputs[tp] = generate(engine, prompts, params)
        finally:
            engine.shutdown()
    for one, two in zip(outputs[1], outputs[2]):
        assert one.token_ids == two.token_ids
        for a, b in zip(one.logprobs, two.logprobs):
            assert abs(a["logprob"] - b["logprob"]) < 1e-4  # row-parallel sums differ only in rounding
