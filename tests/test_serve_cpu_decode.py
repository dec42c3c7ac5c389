"""Decode-only steps in one compiled call (model/cpu_decode.py): bit for bit the Python layers'
results, used only where it applies."""
from __future__ import annotations

import pytest

from internray.serve.model import cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.load()
    if built is None or not (built.has_avx512() and built.has_bf16_matmul()):
        pytest.skip("no compiler, AVX-512 or AVX512_BF16 here: every step runs the Python layers")
    return built


def run(llm, stacked: bool) -> tuple[list, int]:
    """Sampled tokens and their log-probs for prompts of 3..70 tokens joining a running batch, with
    the one-call decode on or off, and how many steps took it."""
    from conftest import generate_joining

    from internray.serve.engine.sampling_params import SamplingParams

    model = llm.engine.runner.model
    kernels, calls = model.decode_kernels, []
    model.decode_kernels = kernels if stacked else None
    decode_layers = model.decode_layers
    model.decode_layers = lambda *a: calls.append(1) or decode_layers(*a)  # a counting spy on the real call
    try:
        prompts = [list(range(5, 5 + n)) for n in (3, 70, 17, 40)]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
        outputs = generate_joining(llm.engine, prompts, params, every=3, keep=lambda out: (out.token_ids, out.logprobs))
    finally:
        model.decode_kernels = kernels
        del model.decode_layers
    return outputs, len(calls)


def test_decode_steps_in_one_call_equal_the_python_layers_bit_for_bit(kernels, tmp_path):
    from conftest import build_tiny_llama

    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM

    model_dir = build_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=3)
    llm = LLM(EngineConfig(model=str(model_dir), dtype="bfloat16", kv_cache_gib=0.01, enable_prefix_caching=False))
    assert llm.engine.runner.model.decode_kernels is kernels
    stacked, stacked_calls = run(llm, stacked=True)
    python, python_calls = run(llm, stacked=False)
    assert stacked == python  # would differ if a step with a prefill chunk went through the one call
    assert python_calls == 0 and stacked_calls > 10  # the one call really ran, on the decode-only steps


def test_steps_it_does_not_cover_run_the_python_layers(kernels, tmp_path):
    """Biased projections (InternLM3, Qwen2) and an int8 KV cache keep the per-layer path."""
    from conftest import build_tiny_llama

    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM

    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    biased = build_tiny_llama(tmp_path / "biased", attention_bias=True, **shape)
    llm = LLM(EngineConfig(model=str(biased), dtype="bfloat16", kv_cache_gib=0.01))
    assert llm.engine.runner.model.decode_kernels is None

    plain = build_tiny_llama(tmp_path / "plain", **shape)
    llm = LLM(EngineConfig(model=str(plain), dtype="bfloat16", kv_cache_gib=0.01, kv_cache_dtype="int8"))
    assert llm.engine.runner.model.decode_kernels is kernels
    outputs, calls = run(llm, stacked=True)
    assert calls == 0 and all(len(tokens) == 12 for tokens, _ in outputs)
