"""The compiled CPU decode-attention kernel against the portable gather + SDPA path it replaces,
for caches at the model's precision and int8 caches (model/kv_cache.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internray.serve.model import cpu_attention, cpu_kernels
from internray.models.quantized import quantize_int8
from internray.serve.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def kernel():
    built = cpu_kernels.load()
    if built is None:
        pytest.skip("no C++ compiler here: the engine uses gather + SDPA (covered by test_serve_engine)")
    return built


def batch_size(few: int, layout: str) -> int:
    """`few` sequences, or enough that the kernel gives each task a whole sequence (all KV heads,
    prefetching the next block) instead of one (sequence, KV head): 4 per thread."""
    return few if layout == "task per head" else max(few, 4 * torch.get_num_threads())


def sdpa_reference(q, cache: KVCache, tables, lengths):
    kv = cache.gather(tables, torch.float32)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = (torch.arange(kv.shape[1])[None] < lengths[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=True).squeeze(2)


@pytest.mark.parametrize("heads,kv_heads,dim,dtype,block,tol", [  # head sizes 32, 64 and 128 have their own loops
    (8, 8, 16, torch.float32, 4, 1e-5), (9, 3, 64, torch.float32, 4, 1e-5), (8, 2, 128, torch.float32, 4, 1e-5),
    (4, 1, 16, torch.bfloat16, 4, 2e-2), (9, 3, 64, torch.bfloat16, 4, 2e-2),
    (9, 3, 64, torch.bfloat16, 16, 2e-2), (8, 2, 128, torch.float16, 32, 2e-3), (8, 4, 32, torch.bfloat16, 16, 2e-2),
    (8, 2, 128, torch.bfloat16, 32, 2e-2)])  # blocks of one and two 16-lane rows (bf16: 16 keys scored at a time)
@pytest.mark.parametrize("layout", ["task per head", "task per sequence"])
def test_kernel_equals_gather_and_sdpa(kernel, heads, kv_heads, dim, dtype, block, tol, layout):
    """Across block edges the kernel's online softmax rescales what it summed so far."""
    gen = torch.Generator().manual_seed(0)
    blocks, batch = 40, batch_size(7, layout)
    cache = KVCache(torch.randn(blocks, block, 2, kv_heads, dim, generator=gen).to(dtype))
    edges = [1, block - 1, block, block + 1, 2 * block + 1, 4 * block, 4 * block + 1]  # around block edges
    lengths = torch.tensor([edges[i % len(edges)] for i in range(batch)])
    width = -(-int(lengths.max()) // block)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in range(batch)])
    q = torch.randn(batch, heads + 2 * kv_heads, dim, generator=gen).to(dtype)[:, :heads]  # rows of a fused qkv
    out = cpu_attention.decode_attention(q, cache, tables, lengths, kernel)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), sdpa_reference(q, cache, tables, lengths), atol=tol, rtol=tol)


def int8_cache(values: torch.Tensor) -> KVCache:
    return KVCache(*quantize_int8(values))


@pytest.mark.parametrize("layout", ["task per head", "task per sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_sdpa_on_the_dequantized_cache_and_stays_near_full_precision(kernel, dtype, layout):
    gen = torch.Generator().manual_seed(1)
    blocks, block, heads, kv_heads, dim = 30, 4, 9, 3, 64
    values = torch.randn(blocks, block, 2, kv_heads, dim, generator=gen)
    values[3, 1] *= 50  # an outlier token: with a scale per vector, it costs the others no precision
    lengths = torch.tensor([(2, 7, 16, 29)[i % 4] for i in range(batch_size(4, layout))])
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:8] for _ in lengths])
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    cache = int8_cache(values)
    out = cpu_attention.decode_attention(q, cache, tables, lengths, kernel)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), sdpa_reference(q, cache, tables, lengths), atol=tol, rtol=tol)
    exact = sdpa_reference(q, KVCache(values), tables, lengths)
    assert (out.float() - exact).abs().max() < 0.02 * exact.abs().max()


def test_int8_write_then_gather_is_within_half_a_step():
    cache = KVCache.allocate(4, 4, 2, 16, torch.float32, torch.device("cpu"), int8=True)
    k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16) * 100
    slots = torch.tensor([0, 1, 2, 5, 9, 15])
    cache.write(slots, k, v)
    rows = cache.gather(torch.arange(4)[None], torch.float32)[0, slots]  # [6, 2, Hkv, D]
    for got, want in ((rows[:, 0], k), (rows[:, 1], v)):
        step = want.abs().amax(-1, keepdim=True) / 127
        assert ((got - want).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cache_write_equals_the_pytorch_write_and_refuses_a_slot_outside(kernel, dtype):
    """store_kv writes keys and values taken as views of a fused qkv row (rows further apart than
    a head group), exactly where the stack + index_copy_ path puts them, and touches nothing else."""
    qkv = torch.randn(300, 9 * 64 + 2 * 3 * 64, dtype=dtype)
    k, v = (part.view(300, 3, 64) for part in qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)[1:])
    slots = torch.randperm(40 * 16)[:300]
    plain, compiled = (KVCache.allocate(40, 16, 3, 64, dtype, torch.device("cpu"), int8=False) for _ in range(2))
    plain.write(slots, k, v)
    compiled.write(slots, k, v, kernel)
    assert torch.equal(compiled.data, plain.data)
    with pytest.raises(RuntimeError, match="slot 640 outside the cache's 640"):
        compiled.write(torch.tensor([3, 640]), k[:2], v[:2], kernel)


@pytest.mark.parametrize("int8", [False, True], ids=["full", "int8"])
@pytest.mark.parametrize("dim", [8, 64])
def test_padding_past_a_sequences_length_is_never_read(kernel, int8, dim):
    values = torch.randn(6, 4, 2, 2, dim)
    cache = int8_cache(values) if int8 else KVCache(values)
    tables = torch.tensor([[0, 1], [2, 3]])
    lengths = torch.tensor([3, 6])
    q = torch.randn(2, 2, dim)
    before = cpu_attention.decode_attention(q, cache, tables, lengths, kernel)
    poison = (cache.scales if int8 else cache.data)
    poison[0, 3:] = float("nan")  # beyond sequence 0's three tokens
    poison[3, 2:] = float("nan")  # beyond sequence 1's six tokens
    torch.testing.assert_close(cpu_attention.decode_attention(q, cache, tables, lengths, kernel), before)


def causal_reference(q, cache: KVCache, table, context_len):
    """SDPA in fp32 over the gathered context, the chunk's queries offset by the earlier context."""
    kv = cache.gather(table[None], torch.float32)[0, :context_len].float()
    rows = torch.arange(len(q))[:, None] + (context_len - len(q))
    mask = torch.arange(context_len)[None] <= rows
    k, v = kv[:, 0].transpose(0, 1)[None], kv[:, 1].transpose(0, 1)[None]
    return F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k, v, attn_mask=mask,
                                          enable_gqa=True)[0].transpose(0, 1)


@pytest.fixture(scope="module")
def avx512(kernel):
    if not kernel.has_avx512():
        pytest.skip("no AVX-512 here: prefill attention takes SDPA (covered by test_serve_engine)")
    return kernel


@pytest.mark.parametrize("int8", [False, True], ids=["full", "int8"])
@pytest.mark.parametrize("heads,kv_heads,dim,dtype,block,tol", [
    (9, 3, 64, torch.bfloat16, 16, 2e-2), (8, 2, 128, torch.float16, 4, 2e-3), (4, 2, 32, torch.float32, 16, 1e-5),
    (8, 2, 128, torch.bfloat16, 4, 2e-2), (4, 2, 32, torch.bfloat16, 16, 2e-2)])  # bf16: keys scored in pairs
def test_prefill_kernel_equals_causal_sdpa_with_and_without_earlier_context(avx512, heads, kv_heads, dim, dtype,
                                                                           block, tol, int8):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(60, block, 2, kv_heads, dim, generator=gen)
    cache = int8_cache(values) if int8 else KVCache(values.to(dtype))
    for length, context_len in ((1, 1), (15, 15), (37, 37), (20, 53), (1, 40)):  # tiles of 16, chunks after context
        table = torch.randperm(60, generator=gen)[:-(-context_len // block)]
        qkv = torch.randn(length, heads + 2 * kv_heads, dim, generator=gen).to(dtype)
        q = qkv[:, :heads]  # a view with the fused qkv row stride, as the model passes it
        out = cpu_attention.prefill_attention(q, cache, table, context_len, avx512)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), causal_reference(q, cache, table, context_len), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_never_reads_past_the_context_and_refuses_other_head_sizes(avx512, dtype):
    values = torch.randn(4, 16, 2, 2, 64).to(dtype)
    table, q = torch.tensor([2, 0]), torch.randn(10, 4, 64).to(dtype)
    before = cpu_attention.prefill_attention(q, KVCache(values), table, 20, avx512)
    values[0, 4:] = float("nan")  # block 0 holds positions 16..31; the context ends at 20
    values[1] = float("nan")  # not in the table
    torch.testing.assert_close(cpu_attention.prefill_attention(q, KVCache(values), table, 20, avx512), before)
    with pytest.raises(RuntimeError, match="head size 16 is not 32, 64 or 128"):
        cpu_attention.prefill_attention(torch.randn(3, 4, 16), KVCache(torch.randn(4, 16, 2, 2, 16)), table, 20, avx512)


def test_engine_with_compiled_prefill_equals_hf_on_chunked_mixed_batches(avx512, tmp_path):
    """Head size 32 takes the compiled prefill: prompts chunked over small blocks and a small token
    budget, joining a batch that is already decoding, must still continue exactly as HF does."""
    from conftest import build_tiny_llama, generate_joining
    from transformers import AutoModelForCausalLM

    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLMEngine
    from internray.serve.engine.sampling_params import SamplingParams

    model_dir = build_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [list(range(5, 5 + n)) for n in (3, 29, 50, 11)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with torch.no_grad():
        reference = [hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(p):]
                     .tolist() for p in prompts]
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_gib=0.01, block_size=4,
                                    max_num_batched_tokens=16), verbose=False)
    assert engine.runner.prefill_kernel
    assert generate_joining(engine, prompts, greedy, every=2) == reference
