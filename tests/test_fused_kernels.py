"""The Triton kernels of the small fused layers against the plain torch functions they replace.

On a machine without CUDA the kernels run under Triton's interpreter, which must be switched on
before triton is first imported. When another test module imported triton first (without it), the
Triton tests here rerun this file in a fresh interpreter process.
"""

import pytest
import torch
from torch import nn

# First: it switches Triton's interpreter on before any kernel module imports triton.
from tests.triton_interpreter import (  # noqa: I001
    CUDA as _CUDA,
    DEVICE,
    NOT_HERE,
    TRITON_RUNS_HERE as _TRITON_RUNS_HERE,
    needs_triton,
    rerun_in_fresh_process,
    runs_elsewhere,
)

from engine.kernels import perturbed_argmax as argmax_kernel
from engine.kernels import rms_norm as norm_kernel
from engine.kernels import rotary as rotary_kernel
from engine.kernels import silu_and_mul as silu_kernel
from engine.layers import activation, norm, rotary
from engine.layers.fusion import disable_fusion, enable_fusion
from engine.model_config import RopeConfig
from engine.sampler import Sampler, SamplingTensors, perturbed_argmax

# float32: the kernels only sum in another order than torch. bfloat16: a few last-bit differences per rounding,
# since Triton's interpreter truncates float32 -> bfloat16 where the GPU (and torch) round to nearest even.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=4e-2, rtol=2**-5)}


@runs_elsewhere
def test_triton_kernels_in_fresh_process():
    rerun_in_fresh_process(__file__)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, rounded_to: torch.dtype | None = None) -> None:
    """Same shape, dtype and device, close within the tolerance of the dtype the values were rounded to on the way."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype and actual.device == expected.device
    assert actual.is_contiguous()
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[rounded_to or expected.dtype])


def _packed_qkv(num_tokens, q_heads, kv_heads, head_dim, dtype, seed=0):
    """q and k as the model gets them: views of one packed qkv projection, strided over tokens."""
    qkv = _randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed, scale=2.0)
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(-1, q_heads, head_dim), k.view(-1, kv_heads, head_dim)
    assert num_tokens == 1 or not (q.is_contiguous() or k.is_contiguous())
    return q, k


def _cos_sin(head_dim: int, max_positions: int) -> torch.Tensor:
    layer = rotary.RotaryEmbedding(head_dim, max_positions, RopeConfig())
    return layer.cos_sin.to(DEVICE)


# ---------------------------------------------------------------- rms_norm


DTYPES = [torch.float32, torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 1), (1, 7), (5, 33), (3, 128), (4, 300), (2, 16384)])
def test_rms_norm_matches_torch(dtype, rows, width):
    x = _randn(rows, width, dtype=dtype, seed=width, scale=3.0)
    weight = _randn(width, dtype=dtype, seed=1) + 1
    _assert_matches(norm_kernel.rms_norm(x, weight, 1e-6), norm.rms_norm.eager(x, weight, 1e-6))


@needs_triton
def test_rms_norm_with_a_float32_weight_returns_float32_like_torch():
    x = _randn(3, 40, dtype=torch.bfloat16)
    weight = _randn(40, seed=1)
    _assert_matches(norm_kernel.rms_norm(x, weight, 1e-5), norm.rms_norm.eager(x, weight, 1e-5), torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_a_strided_view_of_qkv(dtype):
    q, k = _packed_qkv(5, 6, 2, 24, dtype)
    weight = _randn(24, dtype=dtype, seed=3)
    for heads in (q, k):
        _assert_matches(norm_kernel.rms_norm(heads, weight, 1e-6), norm.rms_norm.eager(heads, weight, 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 5), (7, 96), (3, 1000)])
def test_add_rms_norm_returns_the_norm_and_the_rounded_sum(dtype, rows, width):
    x = _randn(rows, width, dtype=dtype, seed=1)
    residual = _randn(rows, width, dtype=dtype, seed=2, scale=10.0)
    weight = _randn(width, dtype=dtype, seed=3)
    normed, total = norm_kernel.add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_total = norm.add_rms_norm.eager(x, residual, weight, 1e-6)
    if dtype == torch.float32 or _CUDA:  # the interpreter's bfloat16 rounding is not the GPU's
        assert torch.equal(total, expected_total), "the residual sum must be exactly torch's x + residual"
    _assert_matches(total, expected_total)
    _assert_matches(normed, expected_normed)


@needs_triton
def test_add_rms_norm_reads_row_strided_views():
    x = _randn(5, 80, seed=1)[:, 10:50]
    residual = _randn(5, 64, seed=2)[:, :40]
    weight = _randn(40, seed=3)
    actual = norm_kernel.add_rms_norm(x, residual, weight, 1e-6)
    for a, e in zip(actual, norm.add_rms_norm.eager(x, residual, weight, 1e-6)):
        _assert_matches(a, e)


@needs_triton
def test_rms_norm_rejects_a_weight_of_the_wrong_width():
    with pytest.raises(ValueError, match="weight of shape"):
        norm_kernel.rms_norm(_randn(2, 8), _randn(9), 1e-6)


# ---------------------------------------------------------------- rotary (with and without the q/k norm)

ROTARY_CASES = {
    # name: (tokens, q_heads, kv_heads, head_dim)
    "one_token": (1, 4, 4, 16),
    "gqa": (5, 6, 2, 32),
    "odd_half_width": (3, 3, 1, 10),
}


def _positions(num_tokens: int, max_positions: int) -> torch.Tensor:
    # Ends at the table's last row: a kernel reading the wrong row (or past it) shows.
    return torch.arange(max_positions - num_tokens, max_positions, dtype=torch.int32, device=DEVICE).flip(0)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_apply_rotary_matches_torch_on_packed_views(dtype, case):
    num_tokens, q_heads, kv_heads, head_dim = ROTARY_CASES[case]
    q, k = _packed_qkv(num_tokens, q_heads, kv_heads, head_dim, dtype)
    cos_sin = _cos_sin(head_dim, 64)
    positions = _positions(num_tokens, 64)
    actual = rotary_kernel.apply_rotary(positions, q, k, cos_sin)
    expected = rotary.apply_rotary.eager(positions, q, k, cos_sin)
    for a, e in zip(actual, expected):
        _assert_matches(a, e)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_norm_and_rotate_matches_torch_norms_then_rotary(dtype, case):
    num_tokens, q_heads, kv_heads, head_dim = ROTARY_CASES[case]
    q, k = _packed_qkv(num_tokens, q_heads, kv_heads, head_dim, dtype)
    cos_sin = _cos_sin(head_dim, 40)
    positions = _positions(num_tokens, 40)
    q_weight, k_weight = _randn(head_dim, dtype=dtype, seed=5) + 1, _randn(head_dim, dtype=dtype, seed=6) + 1
    actual = rotary_kernel.norm_and_rotate(positions, q, k, cos_sin, q_weight, k_weight, 1e-6)
    expected = rotary.apply_rotary.eager(
        positions, norm.rms_norm.eager(q, q_weight, 1e-6), norm.rms_norm.eager(k, k_weight, 1e-6), cos_sin
    )
    for a, e in zip(actual, expected):
        _assert_matches(a, e)


@needs_triton
def test_rotary_rejects_a_table_of_another_head_dim():
    q, k = _packed_qkv(2, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="cos_sin"):
        rotary_kernel.apply_rotary(_positions(2, 8), q, k, _cos_sin(8, 8))


# ---------------------------------------------------------------- silu_and_mul


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (2, 2600), (2, 3, 14)])
def test_silu_and_mul_matches_torch(dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=shape[-1], scale=3.0)
    _assert_matches(silu_kernel.silu_and_mul(x), activation.silu_and_mul.eager(x))


@needs_triton
def test_silu_and_mul_reads_a_row_strided_view():
    x = _randn(4, 30, scale=3.0)[:, :20]
    _assert_matches(silu_kernel.silu_and_mul(x), activation.silu_and_mul.eager(x))


# ---------------------------------------------------------------- perturbed_argmax


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
# Rows of a small batch are split over programs (3 x 9000: 5 splits); many rows, or a small vocabulary, take one each.
@pytest.mark.parametrize("rows, vocab", [(1, 7), (6, 300), (3, 9000), (130, 2500)])
def test_perturbed_argmax_picks_the_same_tokens_as_torch(dtype, rows, vocab):
    logits = _randn(rows, vocab, dtype=dtype, seed=vocab, scale=3.0)
    generator = torch.Generator().manual_seed(rows)
    noise = torch.empty(rows, vocab).exponential_(generator=generator).to(DEVICE)
    # Greedy (0) and random rows alternate; the one-row case is random.
    temperatures = torch.tensor([0.7, 0.0, 1.3, 0.0, 0.2, 0.0] * 22, device=DEVICE)[:rows]
    expected = perturbed_argmax.eager(logits, temperatures, noise)
    # Twice: the split rows' arrival counts must be back at zero after each call.
    for _ in range(2):
        actual = argmax_kernel.perturbed_argmax(logits, temperatures, noise)
        assert actual.dtype == torch.int64 and torch.equal(actual, expected)
    greedy = temperatures == 0
    assert torch.equal(actual[greedy], logits[greedy].float().argmax(-1))


@needs_triton
def test_perturbed_argmax_greedy_ties_go_to_the_lowest_token():
    logits = torch.zeros(4, 5000, device=DEVICE)
    # Splits of 2048 tokens: ties across splits, inside the last split, across lanes of one split.
    for row, tied in enumerate([[4500, 77, 4097], [4500, 4097], [4100, 2100], [4999, 2048 + 4999 - 4096]]):
        logits[row, tied] = 1.0
    tokens = argmax_kernel.perturbed_argmax(logits, torch.zeros(4, device=DEVICE), torch.ones(4, 5000, device=DEVICE))
    assert tokens.tolist() == [77, 4097, 2100, 2951]


@needs_triton
def test_perturbed_argmax_of_a_row_of_minus_infinity_is_token_zero_as_in_torch():
    logits = torch.full((2, 5000), float("-inf"), device=DEVICE)
    temperatures, noise = torch.tensor([0.0, 1.0], device=DEVICE), torch.ones(2, 5000, device=DEVICE)
    expected = perturbed_argmax.eager(logits, temperatures, noise)
    assert torch.equal(argmax_kernel.perturbed_argmax(logits, temperatures, noise), expected)


# ---------------------------------------------------------------- the layers with fusion enabled and disabled


@pytest.fixture
def fused():
    """Layer functions routed to their kernels (CPU tensors too, under the interpreter), restored afterwards."""
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    yield lambda: enable_fusion(cpu_too=not _CUDA)
    disable_fusion()


def _with_and_without_fusion(enable, compute):
    disable_fusion()
    plain = compute()
    enable()
    fused_result = compute()
    disable_fusion()
    return plain, fused_result


class _ReturnQueries(nn.Module):
    """Stands in for paged attention: returns q, so the test sees the q/k norm and rotary of DecoderAttention."""

    def forward(self, q, k, v, metadata):
        return q + k.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_decoder_attention_gives_the_same_output_fused(fused, qk_norm):
    from engine.model_config import model_config_from_dict
    from engine.models.llama import DecoderAttention

    config = model_config_from_dict(dict(architectures=["Qwen3ForCausalLM"], vocab_size=32, hidden_size=48,
                                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16))  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):
        layer = DecoderAttention(config, rotary.RotaryEmbedding(16, 32, config.rope), None, False, qk_norm)
        for param in layer.parameters():
            nn.init.normal_(param, 1.0 if param.dim() == 1 else 0.0, 0.3)
    layer.attn = _ReturnQueries()
    positions = torch.tensor([0, 31, 5], device=DEVICE)
    hidden = _randn(3, 48, seed=4)
    with torch.no_grad():
        plain, fused_out = _with_and_without_fusion(fused, lambda: layer(positions, hidden, None))
    _assert_matches(fused_out, plain)


def test_norm_activation_and_sampler_layers_give_the_same_results_fused(fused):
    x, residual = _randn(4, 40, dtype=torch.bfloat16, seed=1), _randn(4, 40, dtype=torch.bfloat16, seed=2)
    layer_norm = norm.RMSNorm(40).to(DEVICE, torch.bfloat16)
    plain, fused_result = _with_and_without_fusion(fused, lambda: (layer_norm(x), *layer_norm(x, residual)))
    for a, e in zip(fused_result, plain):
        _assert_matches(a, e)

    gate_up = _randn(4, 24, dtype=torch.bfloat16, seed=3, scale=3.0)
    plain, fused_result = _with_and_without_fusion(fused, lambda: activation.SiluAndMul()(gate_up))
    _assert_matches(fused_result, plain)

    logits = _randn(6, 500, seed=7, scale=3.0)
    params = SamplingTensors(temperatures=torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0, 0.9], device=DEVICE))
    plain, fused_result = _with_and_without_fusion(fused, lambda: Sampler(3, DEVICE)(logits, params))
    assert torch.equal(fused_result, plain)


def test_fusion_leaves_cpu_tensors_to_torch_by_default(monkeypatch):
    def kernel_must_not_run(*args):
        raise AssertionError("a CPU tensor reached the Triton kernel")

    monkeypatch.setattr(norm_kernel, "rms_norm", kernel_must_not_run)
    x, weight = torch.randn(3, 8), torch.randn(8)
    try:
        enable_fusion()
        assert torch.equal(norm.rms_norm(x, weight, 1e-6), norm.rms_norm.eager(x, weight, 1e-6))
        if _CUDA:
            with pytest.raises(AssertionError, match="reached the Triton kernel"):
                norm.rms_norm(x.cuda(), weight.cuda(), 1e-6)
    finally:
        disable_fusion()
