"""The compiled CPU decode-attention kernel against the portable gather + SDPA path it replaces."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internray.serve.model import cpu_attention
from internray.serve.model.layers import gather_blocks


@pytest.fixture(scope="module")
def kernel():
    built = cpu_attention.load()
    if built is None:
        pytest.skip("no C++ compiler here: the engine uses gather + SDPA (covered by test_serve_engine)")
    return built


def sdpa_reference(q, cache, tables, lengths):
    kv = gather_blocks(cache, tables)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = (torch.arange(kv.shape[1])[None] < lengths[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=True).squeeze(2)


@pytest.mark.parametrize("heads,kv_heads,dtype,tol", [(8, 8, torch.float32, 1e-5), (9, 3, torch.float32, 1e-5),
                                                      (4, 1, torch.bfloat16, 2e-2)])
def test_kernel_equals_gather_and_sdpa(kernel, heads, kv_heads, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    blocks, block, dim, batch = 40, 4, 16, 7
    cache = torch.randn(blocks, block, 2, kv_heads, dim, generator=gen).to(dtype)
    lengths = torch.tensor([1, 3, 4, 5, 9, 16, 17])  # inside, at and across block edges
    width = -(-int(lengths.max()) // block)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in range(batch)])
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    out = cpu_attention.decode_attention(q, cache, tables, lengths, kernel)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), sdpa_reference(q, cache, tables, lengths), atol=tol, rtol=tol)


def test_padding_past_a_sequences_length_is_never_read(kernel):
    cache = torch.randn(6, 4, 2, 2, 8)
    tables = torch.tensor([[0, 1], [2, 3]])
    lengths = torch.tensor([3, 6])
    q = torch.randn(2, 2, 8)
    before = cpu_attention.decode_attention(q, cache, tables, lengths, kernel)
    cache[0, 3:] = float("nan")  # beyond sequence 0's three tokens
    cache[3, 2:] = float("nan")  # beyond sequence 1's six tokens
    torch.testing.assert_close(cpu_attention.decode_attention(q, cache, tables, lengths, kernel), before)
