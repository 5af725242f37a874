"""The fused Triton kernel on int8 / int4 experts (w8a16, w4a16) against the reference MoE on the
dequantised weights (interpreter on CPU; compiled on a GPU)."""
import pytest
import torch

from moe_rt.kernels.fused_moe import fused_experts, interpret_mode
from moe_rt.layers.moe.reference import reference_experts
from moe_rt.quant.experts import quantize

from test_fused_moe import CASES, SMALL, assert_matches, make_inputs

# (case index, int4 group size): the group divides D and I of the case, never a whole block
QCASES = [(0, 8), (2, 16), (3, 8), (4, 8)]


def _run(case, bits, group, device, seed):
    T, D, I, S, K, used, neg = CASES[case]
    hidden, w13, w2, ids, weights = make_inputs(T, D, I, S, K, used, neg, torch.float32, device)
    q13, q2 = quantize(w13, bits, group), quantize(w2, bits, group)
    out = fused_experts(hidden, q13, q2, ids, weights, config=SMALL)
    ref = reference_experts(hidden.cpu(), q13.dequantize().cpu(), q2.dequantize().cpu(), ids.cpu(), weights.cpu())
    assert_matches(out.cpu(), ref, torch.float32, seed)
    # quantization did change the weights: the kernel is not reading full-precision ones
    full = reference_experts(hidden.cpu(), w13.cpu(), w2.cpu(), ids.cpu(), weights.cpu())
    assert (out.cpu() - full).abs().max() > 1e-4


@pytest.mark.skipif(not interpret_mode(), reason="CPU interpreter test (a GPU is present)")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case,group", QCASES)
def test_quantized_fused_matches_reference_cpu(case, group, bits, seed):
    _run(case, bits, group, "cpu", seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case,group", QCASES)
def test_quantized_fused_matches_reference_cuda(case, group, bits, seed):
    _run(case, bits, group, "cuda", seed)


@pytest.mark.skipif(not interpret_mode(), reason="CPU engine path needs TRITON_INTERPRET=1")
def test_triton_engine_with_int4_experts_matches_reference_compute(mixtral_dir):
    from moe_rt_app import LLM

    prompt = [5, 6, 7, 8, 9, 10, 11]
    opts = dict(dtype="float32", device="cpu", progress=False, expert_bits=4, expert_group_size=32)
    fused = LLM(mixtral_dir, expert_compute="triton", **opts).prompt_logits(prompt)
    ref = LLM(mixtral_dir, expert_compute="reference", **opts).prompt_logits(prompt)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
