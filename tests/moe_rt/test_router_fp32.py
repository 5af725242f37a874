"""DeepSeek routers stay in float32 under a bf16 model, as in transformers (gate weight and, for V3,
e_score_correction_bias are kept float32 there): bf16 rounding of either flips near-tied choices."""
import pytest
import torch

from checkpoints import write_checkpoint
from moe_rt.layers.moe.block import MoEBlock
from moe_rt.loader import load_model

T = 4096  # enough random tokens that some near-tied choices would flip under a bf16 router


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_bf16_deepseek_routes_exactly_as_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_checkpoint(tmp_path, family, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model, _ = load_model(folder, dtype=torch.bfloat16, progress=False)
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    assert block.gate.weight.dtype == torch.float32
    if family == "deepseek_v3":
        assert block.e_score_correction_bias.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16  # only the router is kept in float32

    x = torch.randn(T, block.gate.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    seen = []
    model.moe_ctx.hub.subscribe(seen.append)
    with torch.no_grad():
        block(x)
        _, ref_w, ref_ids = hf.model.layers[block.layer_id].mlp.gate(x)
    ev = seen[0]
    # transformers' top-k is unsorted: compare each token's choices in expert-id order
    ids, order = ev.topk_ids.sort(dim=-1)
    ref_ids, ref_order = ref_ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids), f"{(ids != ref_ids).any(-1).sum()} of {T} tokens chose other experts"
    torch.testing.assert_close(ev.topk_weights.gather(1, order), ref_w.gather(1, ref_order), rtol=0, atol=0)


def test_residual_gate_reads_a_float32_router_under_a_bf16_model(tmp_path):
    from parallel.dispatchers.speculative import ResidualGate

    model, _ = load_model(write_checkpoint(tmp_path, "deepseek_v3", seed=4), dtype=torch.bfloat16, progress=False)
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    norm = model.layers[block.layer_id].post_attention_layernorm
    gate = ResidualGate([norm], [block.gate])
    x = torch.randn(5, block.gate.in_features).to(torch.bfloat16)
    expected = torch.nn.functional.linear(norm(x).float(), block.gate.weight)
    torch.testing.assert_close(gate(0, x), expected, rtol=0, atol=0)
