"""Quantized experts: the formats, the torch backend's fast paths against the dequantised
reference, and LLM(expert_bits=...) on a checkpoint on disk."""
import pytest
import torch

from moe_rt_app import LLM
from moe_rt.errors import MoeRtError
from moe_rt.layers.moe import compute_quant
from moe_rt.layers.moe.compute import torch_experts
from moe_rt.layers.moe.reference import reference_experts
from moe_rt.quant.experts import QuantizedStack, quantize, quantize_experts


def test_int8_format_by_hand():
    s = 2.0 ** -7  # one slot, one row: scale max|w| / 127 = 2^-7, a bfloat16 value
    w = torch.tensor([[[127 * s, -63.5 * s, 0.0, s]]])
    q = quantize(w, 8)
    assert q.qweight.tolist() == [[[127, -64, 0, 1]]]  # -63.5 rounds to even
    torch.testing.assert_close(q.scales, torch.tensor([[[s]]]))
    assert q.shape == w.shape and q.dtype == w.dtype


def test_int4_format_by_hand():
    # one group of 4 columns from -1 to 14: scale 1, zero = min + 8 * scale = 7
    w = torch.tensor([[[-1.0, 14.0, 4.0, 5.4]]])
    q = quantize(w, 4, group_size=4)
    codes = [0, 15, 5, 6]  # (w - min) / scale rounded
    assert q.qweight.tolist() == [[[codes[0] | codes[1] << 4, codes[2] | codes[3] << 4]]]
    torch.testing.assert_close(q.scales, torch.tensor([[[1.0]]]))
    torch.testing.assert_close(q.zeros, torch.tensor([[[7.0]]]))
    torch.testing.assert_close(q.dequantize(), torch.tensor([[[-1.0, 14.0, 4.0, 5.0]]]))


def test_scales_and_zeros_are_bfloat16_values():
    """The CPU kernels take bfloat16 scales: every path computes with exactly those numbers."""
    q = quantize(torch.randn(2, 64, 128), 4, 32)
    for t in (q.scales, q.zeros, quantize(torch.randn(2, 64, 128), 8).scales):
        assert torch.equal(t.to(torch.bfloat16).float(), t)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_rounding_error_is_at_most_half_a_step(bits, group):
    torch.manual_seed(0)
    w = torch.randn(3, 40, 128)
    q = quantize(w, bits, group or 64)
    err = (q.dequantize() - w).abs()
    step = q.scales.repeat_interleave(128 // q.scales.shape[-1], dim=-1)
    assert (err <= step / 2 + 1e-6).all()
    # int8: 1 byte a weight + a float32 scale a row; int4: half a byte + a float32 scale and zero a group
    per_scale = 1 if bits == 8 else 128 // group
    assert q.nbytes() == w.numel() * bits // 8 + 3 * 40 * per_scale * (4 if bits == 8 else 8)


def test_group_size_must_divide_the_input_size():
    with pytest.raises(MoeRtError, match="expert_group_size 64 does not divide the input size 96"):
        quantize(torch.zeros(1, 4, 96), 4, 64)


def _problem(T, S=6, D=64, I=32, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    w13 = torch.randn(S, 2 * I, D, generator=g) * 0.2
    w2 = torch.randn(S, D, I, generator=g) * 0.2
    ids = torch.randint(0, S, (T, K), generator=g)
    ids[0, 1] = -1  # a choice computed elsewhere contributes nothing
    weights = torch.rand(T, K, generator=g)
    return hidden, w13, w2, ids, weights


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("T", [1, 5, 40])
@pytest.mark.parametrize("path", ["kernel", "dequantise"])
def test_torch_backend_matches_the_dequantised_reference(bits, T, path, monkeypatch):
    hidden, w13, w2, ids, weights = _problem(T)
    q13, q2 = quantize_experts(w13, bits, 32), quantize_experts(w2, bits, 32)
    assert q13.cpu is not None  # CPU stacks carry the low-bit kernels' operands
    monkeypatch.setattr(compute_quant, "CPU_LOWBIT_MAX_ROWS", {8: 10**6, 4: 10**6} if path == "kernel" else {8: 0, 4: 0})
    got = torch_experts(hidden, q13, q2, ids, weights)
    want = reference_experts(hidden, q13.dequantize(), q2.dequantize(), ids, weights)
    if path == "kernel":  # bfloat16 activations, scales and outputs: about 0.5% of the output's size
        assert (got - want).norm() / want.norm() < 1.5e-2
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    else:  # dequantised to float32, multiplied in float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the reference reads quantized stacks itself, the same way
    torch.testing.assert_close(reference_experts(hidden, q13, q2, ids, weights), want)


def test_off_cpu_stacks_take_the_dequantising_path():
    hidden, w13, w2, ids, weights = _problem(3)
    q13, q2 = quantize(w13, 4, 32), quantize(w2, 4, 32)  # no CPU operands, as on a GPU
    got = torch_experts(hidden, q13, q2, ids, weights)
    torch.testing.assert_close(got, reference_experts(hidden, q13, q2, ids, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_llm_with_quantized_experts_matches_reference_compute(mixtral_dir, bits):
    ids = list(range(3, 40))
    fast = LLM(mixtral_dir, dtype="float32", progress=False, expert_bits=bits, expert_group_size=32)
    slow = LLM(mixtral_dir, dtype="float32", progress=False, expert_bits=bits, expert_group_size=32,
               expert_compute="reference")
    full = LLM(mixtral_dir, dtype="float32", progress=False, expert_compute="reference")
    store = fast.model.moe_ctx.store
    assert isinstance(store.w13[0], QuantizedStack) and store.w13[0].bits == bits
    a, b, c = fast.prompt_logits(ids), slow.prompt_logits(ids), full.prompt_logits(ids)
    assert (a - b).norm() / b.norm() < 1.5e-2  # bfloat16 activations in the CPU kernels
    # quantization changes the logits, a little
    assert 0 < (b - c).abs().max() < (0.2 if bits == 8 else 1.0)
    # dense weights stay in the compute dtype
    assert fast.model.lm_head.weight.dtype == torch.float32


def test_expert_options_are_validated(mixtral_dir):
    with pytest.raises(MoeRtError, match="expert_bits"):
        LLM(mixtral_dir, progress=False, expert_bits=3)
    with pytest.raises(MoeRtError, match="expert_group_size"):
        LLM(mixtral_dir, progress=False, expert_bits=4, expert_group_size=48)
    # 64 divides the hidden size (64) but not the intermediate size (96)
    with pytest.raises(MoeRtError, match="expert_group_size 64 does not divide the input size 96"):
        LLM(mixtral_dir, progress=False, expert_bits=4, expert_group_size=64)


def test_int4_rows_the_cpu_kernel_cannot_pack_take_the_dequantising_path():
    odd = quantize_experts(torch.randn(2, 40, 32), 4, 32)  # the packing op refuses N % 16 != 0
    assert odd.cpu is None
    assert quantize_experts(torch.randn(2, 48, 32), 4, 32).cpu is not None
    hidden, ids, weights = torch.randn(3, 32), torch.tensor([[0, 1], [1, -1], [0, 0]]), torch.rand(3, 2)
    w2 = quantize_experts(torch.randn(2, 32, 20), 4, 4)  # the int4 kernel takes groups of 32..256 only
    assert w2.cpu is None
    got = torch_experts(hidden, odd, w2, ids, weights)
    torch.testing.assert_close(got, reference_experts(hidden, odd, w2, ids, weights), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("rows, one_copy", [(128, True), (48, False)])
def test_cpu_int4_keeps_one_copy_of_the_codes_when_the_kernel_order_is_known(rows, one_copy):
    w = torch.randn(3, rows, 64)
    plain, cpu = quantize(w, 4, 32), quantize_experts(w, 4, 32)
    assert (cpu.layout == "cpu_int4") == one_copy and (cpu.cpu.qweight is cpu.codes) == one_copy
    # whatever is held, it reads back as the same codes and weights
    assert torch.equal(cpu.qweight, plain.qweight)
    assert torch.equal(cpu.dequantize(), plain.dequantize()) and torch.equal(cpu.dequantize(2), plain.dequantize(2))
    kernel_scales = 3 * 2 * rows * 2 * 2  # bfloat16 (scale, zero) pairs
    assert cpu.nbytes() == plain.nbytes() + kernel_scales + (0 if one_copy else plain.codes.numel())
