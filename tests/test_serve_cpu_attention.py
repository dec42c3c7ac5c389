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


def sdpa_reference(q, cache: KVCache, tables, lengths):
    kv = cache.gather(tables, torch.float32)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = (torch.arange(kv.shape[1])[None] < lengths[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=True).squeeze(2)


@pytest.mark.parametrize("heads,kv_heads,dim,dtype,block,tol", [  # head sizes 32, 64 and 128 have their own loops
    (8, 8, 16, torch.float32, 4, 1e-5), (9, 3, 64, torch.float32, 4, 1e-5), (8, 2, 128, torch.float32, 4, 1e-5),
    (4, 1, 16, torch.bfloat16, 4, 2e-2), (9, 3, 64, torch.bfloat16, 4, 2e-2),
    (9, 3, 64, torch.bfloat16, 16, 2e-2), (8, 2, 128, torch.float16, 32, 2e-3), (8, 4, 32, torch.bfloat16, 16, 2e-2)])  # blocks of one and two 16-lane rows
def test_kernel_equals_gather_and_sdpa(kernel, heads, kv_heads, dim, dtype, block, tol):
    """Across block edges the kernel's online softmax rescales what it summed so far."""
    gen = torch.Generator().manual_seed(0)
    blocks, batch = 40, 7
    cache = KVCache(torch.randn(blocks, block, 2, kv_heads, dim, generator=gen).to(dtype))
    lengths = torch.tensor([1, block - 1, block, block + 1, 2 * block + 1, 4 * block, 4 * block + 1])  # around block edges
    width = -(-int(lengths.max()) // block)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in range(batch)])
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    out = cpu_attention.decode_attention(q, cache, tables, lengths, kernel)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), sdpa_reference(q, cache, tables, lengths), atol=tol, rtol=tol)


def int8_cache(values: torch.Tensor) -> KVCache:
    return KVCache(*quantize_int8(values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_sdpa_on_the_dequantized_cache_and_stays_near_full_precision(kernel, dtype):
    gen = torch.Generator().manual_seed(1)
    blocks, block, heads, kv_heads, dim = 30, 4, 9, 3, 64
    values = torch.randn(blocks, block, 2, kv_heads, dim, generator=gen)
    values[3, 1] *= 50  # an outlier token: with a scale per vector, it costs the others no precision
    lengths = torch.tensor([2, 7, 16, 29])
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
