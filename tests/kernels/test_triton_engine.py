"""expert_compute="triton" in the whole engine: same logits and greedy tokens as the torch
backend, all experts resident and with an expert cache that passes only resident slots in.

Runs in Triton's CPU interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1 without a
GPU), so the model is tiny and fp32, where the kernels use IEEE dots and match to ~1e-6.
"""
import pytest
import torch

from checkpoints import write_checkpoint
from moe_rt_app import LLM, SamplingParams
from moe_rt.kernels.fused_moe import interpret_mode

pytestmark = pytest.mark.skipif(not interpret_mode(), reason="CPU engine path needs TRITON_INTERPRET=1")

PROMPTS = [[5, 6, 7, 8, 9], [10, 20, 30], [100, 3, 44, 55, 66, 77, 88]]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Qwen2-MoE: 8 experts top-4 (K > 2) plus a shared expert outside the fused step.
    return str(write_checkpoint(tmp_path_factory.mktemp("qwen2moe"), "qwen2_moe", num_experts_per_tok=4))


@pytest.fixture(scope="module")
def torch_run(model):
    llm = LLM(model, dtype="float32", device="cpu", progress=False, expert_compute="torch")
    logits = llm.prompt_logits(PROMPTS[2])
    return logits, [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def test_triton_backend_matches_torch_backend(model, torch_run):
    ref_logits, ref_tokens = torch_run
    llm = LLM(model, dtype="float32", device="cpu", progress=False, expert_compute="triton")
    assert llm.engine.model.moe_ctx.compute.__name__ == "triton_experts"
    torch.testing.assert_close(llm.prompt_logits(PROMPTS[2]), ref_logits, rtol=1e-4, atol=1e-4)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] == ref_tokens


@pytest.mark.parametrize("cache", [
    dict(offload="cpu", capacity_slots=2, policy="lru"),  # fewer slots than a token's top-4
    dict(offload="disk", capacity_slots=5, policy="predictive", predictor="gate_lookahead"),
], ids=["cpu-2slots-lru", "disk-5slots-predictive"])
def test_triton_backend_with_expert_cache(model, torch_run, cache):
    _, ref_tokens = torch_run
    llm = LLM(model, dtype="float32", device="cpu", progress=False, expert_compute="triton", cache=cache)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
        stats = llm.expert_cache.stats()
    finally:
        llm.expert_cache.close()
    assert tokens == ref_tokens
    assert stats["misses"] > 0  # the cache really was smaller than the model
