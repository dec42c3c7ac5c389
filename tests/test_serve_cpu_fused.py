"""The fused CPU ops (model/cpu_fused.py) against the plain PyTorch ops they replace, op by op and
through a whole model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internray.serve.model import cpu_kernels
from internray.serve.model.layers import RMSNorm, apply_rotary


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.load()
    if built is None or not built.has_avx512():
        pytest.skip("no compiler or no AVX-512 here: the model runs the plain ops (covered by test_serve_engine)")
    return built


def within_one_step(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal but for rare last-place differences (fp32 sums in another order, exp within an ulp; a
    unit in an intermediate becomes up to two after RMSNorm's weight)."""
    differ = got != want
    assert differ.float().mean() < 0.01, f"{int(differ.sum())} of {got.numel()} differ"
    step = 2 * want.float().abs() * torch.finfo(want.dtype).eps + torch.finfo(want.dtype).tiny
    assert ((got.float() - want.float()).abs() <= step).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_adds_the_residual_in_place_and_normalizes_like_the_plain_ops(kernels, dtype):
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(37, 576, generator=gen).to(dtype) for _ in range(2))
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = (torch.rand(576, generator=gen) + 0.5).to(dtype)
    want, want_sum = norm(x, residual.clone())
    got = kernels.rms_norm(x, residual, norm.weight, 1e-5)
    assert torch.equal(residual, want_sum)  # x + residual rounded once, written back
    within_one_step(got, want)
    within_one_step(kernels.rms_norm(x, None, norm.weight, 1e-5), norm(x)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_equals_silu_of_the_gate_times_up(kernels, dtype):
    gate_up = (torch.randn(37, 2 * 1536, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, float("nan")])  # saturated both ways, zero, NaN
    got = kernels.silu_and_mul(gate_up)
    want = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    assert got[0, 3].isnan() and got.shape == want.shape
    got[0, 3] = want[0, 3] = 0
    within_one_step(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_rotates_q_and_k_in_place_and_leaves_v(kernels, dtype):
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, tokens = 9, 3, 64, 21
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    cos, sin = (torch.randn(tokens, dim, generator=gen).to(dtype) for _ in range(2))
    q, k, v = (part.reshape(tokens, -1, dim) for part in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
    want_q, want_k, want_v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.clone()
    kernels.rotary_(qkv, cos, sin, heads + kv_heads, dim)
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, want_v)  # no transcendental: exact


def test_bad_inputs_are_refused_by_name(kernels):
    with pytest.raises(RuntimeError, match="silu_and_mul: bf16 or fp16 only"):
        kernels.silu_and_mul(torch.randn(4, 64))
    with pytest.raises(RuntimeError, match="rms_norm: row size must be a multiple of 16"):
        kernels.rms_norm(torch.randn(4, 24).bfloat16(), None, torch.ones(24).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="rotary_: cos/sin must be"):
        kernels.rotary_(torch.randn(4, 128).bfloat16(), torch.randn(4, 32), torch.randn(4, 32), 2, 32)


def test_a_bf16_model_with_fused_ops_is_as_close_to_fp32_as_without(kernels, tmp_path):
    """Prompt log-probs of a bf16 model, fused and unfused, against the same model in fp32: the
    fused ops must be used (fp32 must not use them) and lose nothing in accuracy."""
    from conftest import build_tiny_llama, prompt_logprobs

    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM

    model = build_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2)  # head size 32: the fused shapes

    def logprobs(dtype: str, fused: bool) -> torch.Tensor:
        llm = LLM(EngineConfig(model=str(model), dtype=dtype, kv_cache_gib=0.01, enable_prefix_caching=False))
        runner = llm.engine.runner
        assert (runner.model.model.layers[0].mlp.fused is not None) == (dtype == "bfloat16")
        if not fused:
            for module in runner.model.modules():
                if hasattr(module, "fused"):
                    module.fused = None
        return prompt_logprobs(llm)

    exact = logprobs("float32", fused=False)
    fused_error = (logprobs("bfloat16", fused=True) - exact).abs().mean()
    plain_error = (logprobs("bfloat16", fused=False) - exact).abs().mean()
    assert 0 < fused_error <= 1.25 * plain_error + 1e-3
