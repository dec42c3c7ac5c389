"""The bf16 matmul kernel (model/cpu_matmul.py) against fp32 arithmetic, and its use by the engine."""
from __future__ import annotations

import pytest
import torch

from internray.serve.model import cpu_kernels, cpu_matmul


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels.load()
    if built is None or not built.has_bf16_matmul():
        pytest.skip("no compiler or no AVX512_BF16 here: bf16 linears run on oneDNN (covered by test_serve_engine)")
    return built


def within_rounding(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """bf16 results of fp32 sums: nearly all equal to the exact value's rounding, and each within
    one bf16 step of it plus what fp32 sums in another order than the reference's may differ by
    (features x fp32 eps x the sum of the products' magnitudes: where terms cancel, that is more
    than a step of the small result)."""
    x, weight = x.reshape(-1, x.shape[-1]).float(), weight.float()
    exact = x @ weight.T + (0 if bias is None else bias)
    want = exact.bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got != want).sum() <= 0.01 * want.numel()
    order = x.shape[1] * torch.finfo(torch.float32).eps * (x.abs() @ weight.abs().T)
    assert ((got.float() - exact).abs() <= 2 * exact.abs() * torch.finfo(torch.bfloat16).eps + order + 1e-30).all()


@pytest.mark.parametrize("rows, cols, features", [
    (1, 960, 576),    # one decoding sequence: a weight stream per call
    (5, 70, 64),      # columns past the last full tile of 32
    (12, 32, 2),      # one register block of rows, one pair of inputs
    (13, 33, 30),     # a block of 12 rows and a remainder of one, a tile and one column
    (97, 576, 1536),  # several chunks of rows per tile
    (0, 16, 8),       # an empty batch
])
def test_bf16_matmul_equals_fp32_arithmetic_rounded_once(kernels, rows, cols, features):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    weight = torch.randn(cols, features, generator=gen).bfloat16()
    x = torch.randn(rows, features, generator=gen).bfloat16()
    bias = torch.randn(cols, generator=gen)
    packed = cpu_matmul.pack_bf16(weight)
    within_rounding(cpu_matmul.bf16_matmul(kernels, x, packed, None, cols), x, weight)
    within_rounding(cpu_matmul.bf16_matmul(kernels, x, packed, bias, cols), x, weight, bias)  # bias before rounding


def test_rows_may_lie_apart_and_leading_dims_are_kept(kernels):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 64, generator=gen).bfloat16()
    wide = torch.randn(6, 100, generator=gen).bfloat16()
    x = wide[:, 10:74]  # rows 100 apart, as a slice of a fused projection's output
    got = cpu_matmul.bf16_matmul(kernels, x.reshape(2, 3, 64), cpu_matmul.pack_bf16(weight), None, 48)
    assert got.shape == (2, 3, 48)
    within_rounding(got.reshape(6, 48), x, weight)


def test_mismatched_inputs_are_refused_by_name(kernels):
    packed = cpu_matmul.pack_bf16(torch.randn(40, 64).bfloat16())
    with pytest.raises(RuntimeError, match="x has 32 features, the packed weight 64"):
        kernels.bf16_matmul(torch.randn(4, 32).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="x must be \\[M, K\\] bf16 rows"):
        kernels.bf16_matmul(torch.randn(4, 64), packed, None, 40)
    with pytest.raises(RuntimeError, match="bias must be 40 contiguous fp32 numbers"):
        kernels.bf16_matmul(torch.randn(4, 64).bfloat16(), packed, torch.zeros(40).bfloat16(), 40)
    with pytest.raises(ValueError, match="even number of input features, not 7"):
        cpu_matmul.pack_bf16(torch.randn(4, 7).bfloat16())


def test_a_bf16_model_runs_its_linears_on_the_kernel_and_stays_as_close_to_fp32(kernels, tmp_path):
    """Prompt log-probs of a bf16 model whose linears run on the kernel, and of the same bf16
    model with no compiled kernels (oneDNN linears, plain ops), against fp32: the kernel must be
    used by every linear (including q/k/v with a bias) in bf16 only, and lose nothing in accuracy."""
    from conftest import build_tiny_llama, prompt_logprobs

    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM
    from internray.serve.model.layers import Linear

    model = build_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2, attention_bias=True)

    def logprobs(dtype: str, compiled: bool) -> torch.Tensor:
        llm = LLM(EngineConfig(model=str(model), dtype=dtype, kv_cache_gib=0.01, enable_prefix_caching=False,
                               compiled_cpu_kernels=compiled))
        linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
        assert all((m.bf16_kernel is not None) == (compiled and dtype == "bfloat16") for m in linears)
        return prompt_logprobs(llm)

    exact = logprobs("float32", compiled=True)
    kernel_error = (logprobs("bfloat16", compiled=True) - exact).abs().mean()
    plain_error = (logprobs("bfloat16", compiled=False) - exact).abs().mean()
    assert 0 < kernel_error <= 1.25 * plain_error + 1e-3
