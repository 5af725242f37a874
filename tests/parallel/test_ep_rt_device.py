"""Where the EP runtime's own state lives: the tensor-parallel KV cache starts zeroed, and the
dispatcher's placement tables and routing predictor sit on the group's device."""
from __future__ import annotations

import pytest
import torch

from moe_rt.layers.attention import LayerKV
from parallel.tp import shard_kv_cache


def test_sharded_kv_cache_is_zeroed_not_uninitialised():
    # Decode masks the unused slots, but a masked NaN still multiplies its attention weight.
    # Free NaN-filled blocks of the shard's size first, so an uninitialised allocation would
    # most likely reuse them.
    slots, heads, hd, world = 64, 4, 8, 2
    full = [LayerKV(torch.zeros(slots, heads, hd), torch.zeros(slots, heads, hd)) for _ in range(3)]
    for _ in range(8):
        poison = [torch.full((slots, heads // world, hd), float("nan")) for _ in range(6)]
        del poison
    shards = shard_kv_cache(full, world)
    for kv in shards:
        assert kv.k.shape == (slots, heads // world, hd) and kv.v.shape == kv.k.shape
        assert torch.isfinite(kv.k).all() and torch.isfinite(kv.v).all()
        assert not kv.k.any() and not kv.v.any()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from checkpoints import write_checkpoint

    return str(write_checkpoint(tmp_path_factory.mktemp("ep_device"), "mixtral", num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=4, num_local_experts=8))


def test_dispatcher_tables_and_predictor_live_on_the_group_device(model_dir):
    # The meta device stands in for a GPU: nothing may stay on the CPU the model was built on.
    from moe_rt.loader import load_model
    from parallel.apply import apply_expert_parallel
    from parallel.groups import EPGroup
    from parallel.placement import default_placement
    from router_predict.predictors.gate_lookahead import GateLookaheadPredictor

    model, reader = load_model(model_dir, progress=False)
    predictor = GateLookaheadPredictor.from_model(model)
    assert predictor.weights.device.type == "cpu"
    group = EPGroup(0, 2, None, torch.device("meta"))
    rt = apply_expert_parallel(model, group, default_placement(3, 8, 2), "speculative", predictor, reader=reader)
    d = rt.dispatcher
    assert d.device == group.device
    assert d.holder.device == group.device and d.primary.device == group.device
    assert d.predictor is predictor
    held = [v for v in vars(predictor).values() if isinstance(v, torch.Tensor)]
    assert held and all(t.device == group.device for t in held)


def test_alltoall_dispatcher_defaults_to_the_group_device():
    from parallel.dispatchers.alltoall import AllToAllDispatcher
    from parallel.dispatchers.comm import Comm
    from parallel.groups import EPGroup
    from parallel.placement import default_placement
    from parallel.stats import EPStats

    group = EPGroup(0, 2, None, torch.device("meta"))
    d = AllToAllDispatcher(Comm(group, EPStats(0, 2, 1, 1)), default_placement(1, 4, 2))
    assert d.holder.device == d.primary.device == group.device


def test_predictor_to_moves_its_modules_too():
    from router_predict.predictors.learned import LearnedPregate, PreGateNet

    p = LearnedPregate(PreGateNet(3, 16, 1, 8, mlp_hidden=4), top_k=2).to("meta")
    assert all(t.device.type == "meta" for t in p.net.parameters())
    assert all(t.device.type == "meta" for t in p.net.buffers())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dispatcher", ["alltoall", "speculative"])
def test_ep_on_cuda_equals_single_process(model_dir, dispatcher):
    # One rank on the GPU: CPU-resident placement tables (indexed by CUDA ids) or a CPU-resident
    # gate_lookahead predictor (fed CUDA hidden states) fail at the first MoE layer.
    from moe_rt_app import LLM
    from moe_rt.sampling_params import SamplingParams
    from parallel.groups import single_rank
    from moe_rt_app.ep_llm import EPOptions, build_ep_llm

    prompts = [[5, 17, 42, 9, 77, 3, 12], [101, 7, 64]]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    opts = {"dtype": "float32", "max_num_seqs": 4, "kv_cache_memory_gb": 0.01}
    ref = LLM(model_dir, device="cuda", progress=False, **opts)
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    ep = build_ep_llm(model_dir, single_rank("cuda"), EPOptions(dispatcher, predictor="gate_lookahead"), **opts)
    assert ep.runtime.dispatcher.holder.device.type == "cuda"
    assert [o.outputs[0].token_ids for o in ep.generate(prompts, params)] == expected
