"""Exact checks of the EP runtime's parts: byte accounting and dedup on a hand case (2 gloo
ranks), the s-TS balanced assignment, token splits, and one-line errors for bad set-ups."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.compute import torch_experts
from parallel.dispatchers.base import even_split
from parallel.dispatchers.speculative import balanced_assign
from parallel.launch import launch

D, I, E, K = 8, 6, 4, 2
# default placement over 2 ranks: experts 0, 1 on rank 0; 2, 3 on rank 1
HAND_IDS = {0: [[0, 1], [0, 2], [2, 3]], 1: [[2, 3], [0, 1]]}
# dynamic top-k drops choices as -1: they are computed nowhere and travel nowhere
DROPPED_IDS = {0: [[0, -1], [2, -1], [1, 0]], 1: [[3, -1], [-1, 1]]}


def hand_case(ep, hand=HAND_IDS):
    from parallel.apply import EPExpertStore
    from parallel.dispatchers.alltoall import AllToAllDispatcher
    from parallel.dispatchers.comm import Comm
    from parallel.placement import default_placement
    from parallel.stats import EPStats

    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)  # same on all ranks
    ids = torch.tensor(hand[ep.rank])
    hidden = torch.randn(ids.shape[0], D, generator=torch.Generator().manual_seed(10 + ep.rank))
    weights = torch.rand(ids.shape, generator=g)
    stats = EPStats(ep.rank, ep.world, 1, 1)
    disp = AllToAllDispatcher(Comm(ep, stats), default_placement(1, E, 2))
    mine = [0, 1] if ep.rank == 0 else [2, 3]
    slot_of = torch.full((E,), -1)
    slot_of[mine] = torch.arange(2)
    store = EPExpertStore([w13[mine]], [w2[mine]], [slot_of], E)
    d = disp.dispatch(0, hidden, ids, weights)
    experts = store.prepare(0, d.topk_ids)
    y = torch_experts(d.hidden, experts.w13, experts.w2, experts.slots(d.topk_ids), d.topk_weights)
    out = disp.combine(0, y, d)
    ref = torch_experts(hidden, w13, w2, ids, weights)
    return {"rows_in": d.hidden.shape[0], "ids_in": d.topk_ids.tolist(), "out": out, "ref": ref,
            "stats": stats.as_dict()}


def test_hand_case_bytes_dedup_and_result():
    r0, r1 = launch(2, hand_case, timeout_s=60)
    for r in (r0, r1):
        torch.testing.assert_close(r["out"], r["ref"], atol=1e-5, rtol=1e-5)
    # Rank 0 sends token 1 (experts 0 | 2) and token 2 (experts 2, 3: both on rank 1, so ONE row).
    # Rank 1 sends token 1 (experts 0, 1: one row). Rows carry D fp32 values + K ids + K weights.
    # Combine rows are counted by their sender: rank 0 returns 1 row, rank 1 returns 2.
    # Each rank also sends its N-1 = 1 split count (int64) ahead of the dispatch.
    row, meta = 4 * D, 8 * K
    assert r0["stats"]["bytes_by_collective"] == {"a2a_dispatch": 2 * row, "a2a_combine": 1 * row,
                                                  "a2a_meta": 2 * meta + 8}
    assert r1["stats"]["bytes_by_collective"] == {"a2a_dispatch": 1 * row, "a2a_combine": 2 * row,
                                                  "a2a_meta": 1 * meta + 8}
    assert r0["stats"]["a2a_bytes_by_layer"] == [3 * row]
    # Rank 1 computes rank 0's tokens 1 and 2 (rows grouped by source rank) and its own token 0, each once.
    assert r1["rows_in"] == 3
    assert r1["ids_in"] == [[-1, 2], [2, 3], [2, 3]]
    assert r0["ids_in"] == [[0, 1], [0, -1], [0, 1]]
    assert (r0["stats"]["pairs"], r0["stats"]["local_pairs"]) == ([6], [3])
    assert (r1["stats"]["pairs"], r1["stats"]["local_pairs"]) == ([4], [2])


def test_dropped_choices_travel_nowhere():
    r0, r1 = launch(2, hand_case, (DROPPED_IDS,), timeout_s=60)
    for r in (r0, r1):
        torch.testing.assert_close(r["out"], r["ref"], atol=1e-5, rtol=1e-5)
    # Rank 0 sends only token 1 (expert 2) to rank 1; rank 1 sends only token 1 (expert 1) to rank 0.
    assert r0["ids_in"] == [[0, -1], [1, 0], [-1, 1]] and r1["ids_in"] == [[2, -1], [3, -1]]
    assert (r0["stats"]["pairs"], r0["stats"]["local_pairs"]) == ([4], [3])
    assert (r1["stats"]["pairs"], r1["stats"]["local_pairs"]) == ([2], [1])


def test_balanced_assign_exact():
    scores = np.array([[2, 0], [2, 0], [2, 0], [0, 1]])
    assert balanced_assign(scores, cap=2, default=np.array([0, 0, 1, 1])).tolist() == [0, 0, 1, 1]
    # Ties go to the token's default rank, then the lowest rank.
    assert balanced_assign(np.array([[1, 1], [1, 1]]), 1, np.array([1, 0])).tolist() == [1, 0]
    # Strongest preference chooses first: token 1 (2 experts on rank 1) beats token 0 (1 expert).
    assert balanced_assign(np.array([[0, 1], [0, 2]]), 1, np.array([0, 1])).tolist() == [0, 1]
    with pytest.raises(ValueError):
        balanced_assign(np.zeros((5, 2)), 2, np.zeros(5, dtype=np.int64))


def test_even_split_and_owner():
    s = even_split(5, 2)
    assert s.counts == [3, 2] and s.owned(1).tolist() == [3, 4] and s.owner().tolist() == [0, 0, 0, 1, 1]
    assert even_split(1, 4).counts == [1, 0, 0, 0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from checkpoints import write_checkpoint
    from moe_rt.loader import load_model

    d = write_checkpoint(tmp_path_factory.mktemp("ep_units"), "mixtral", num_attention_heads=4,
                         num_key_value_heads=2)
    return load_model(d, progress=False)


def fake_group(world):
    from parallel.groups import EPGroup

    return EPGroup(0, world, None, torch.device("cpu"))


def test_setup_errors(tiny):
    from parallel.apply import apply_expert_parallel
    from parallel.placement import ExpertParallelPlacement, default_placement
    from parallel.tp import check_tp

    model, reader = tiny
    with pytest.raises(MoeRtError, match="placement is for 4 ranks but the group has 2"):
        apply_expert_parallel(model, fake_group(2), default_placement(2, 8, 4), reader=reader)
    missing = ExpertParallelPlacement(ranks=2, layers={l: {e: [e % 2] for e in range(7)} for l in range(2)})
    with pytest.raises(MoeRtError, match=r"expert\(s\) \[7\] not placed"):
        apply_expert_parallel(model, fake_group(2), missing, reader=reader)
    # 2 KV heads cannot be split over 4 ranks.
    with pytest.raises(MoeRtError, match="KV heads \\(2\\) divisible by 4"):
        apply_expert_parallel(model, fake_group(4), default_placement(2, 8, 4), reader=reader)
    with pytest.raises(MoeRtError, match="needs a routing predictor"):
        apply_expert_parallel(model, fake_group(2), default_placement(2, 8, 2), "speculative", reader=reader)
    with pytest.raises(MoeRtError, match="unknown EP dispatcher"):
        apply_expert_parallel(model, fake_group(2), default_placement(2, 8, 2), "ring", reader=reader)
    with pytest.raises(MoeRtError, match="OLMoE"):
        check_tp(4, 4, "full", 2)
    # Nothing above touched the model: errors come before any change.
    assert model.layers[0].self_attn.spec.num_heads == 4


@pytest.mark.parametrize("bits", [8, 4])
def test_ep_store_cuts_the_quantized_stacks(tmp_path_factory, bits):
    """Each rank holds exactly its slots of the resident quantized stacks (every operand, the CPU
    kernels' included), and expert_bytes counts them: the ranks' shares add up to the whole."""
    from checkpoints import write_checkpoint
    from moe_rt.loader import load_model
    from moe_rt.quant.experts import QuantizedStack
    from parallel.apply import build_ep_store
    from parallel.placement import default_placement

    d = write_checkpoint(tmp_path_factory.mktemp("ep_quant"), "mixtral", num_attention_heads=4)
    model, _ = load_model(d, progress=False, expert_bits=bits, expert_group_size=32)
    whole = model.moe_ctx.store
    placement = default_placement(2, 8, 2)
    stores = [build_ep_store(model, placement, r) for r in range(2)]
    assert sum(s.expert_bytes() for s in stores) == whole.expert_bytes()
    full_bytes = 2 * 8 * 3 * 64 * 96 * 4  # the same experts in float32
    assert whole.expert_bytes() < full_bytes * (0.3 if bits == 8 else 0.25)  # scales and zeros included
    for r, store in enumerate(stores):
        for m in range(2):
            mine = placement.experts_on_rank(m, r)
            assert store.slot_of[m][mine].tolist() == list(range(len(mine)))
            for got, held in ((store.w13[m], whole.w13[m]), (store.w2[m], whole.w2[m])):
                assert isinstance(got, QuantizedStack) and got.cpu is not None and got.layout == held.layout
                assert torch.equal(got.dequantize(), held.dequantize()[mine])
                assert torch.equal(got.cpu.qweight, held.cpu.qweight[mine])
                assert torch.equal(got.cpu.scales, held.cpu.scales[mine])
                assert (got.cpu.qweight is got.codes) == (held.cpu.qweight is held.codes)


# A bits plan permutes the resident slots (widest first): layer 0 holds expert 1 at full
# precision and 3, 5 at 8 bits, the rest at 4; layer 1 is uniform int4.
PLAN = {"group_size": 32, "default": 4, "layers": {0: {"full": [1], 8: [3, 5]}}}


def test_ep_store_cuts_a_bits_plan(tmp_path_factory):
    """With a plan, each rank holds its experts at their planned widths, grouped by width, and
    every logical expert maps to the rank slot whose weights are the resident store's for it."""
    from checkpoints import write_checkpoint
    from moe_rt.loader import load_model
    from moe_rt.quant.mixed import MixedStack
    from moe_rt.quant.plan import load_plan
    from parallel.apply import build_ep_store
    from parallel.placement import default_placement

    d = write_checkpoint(tmp_path_factory.mktemp("ep_plan"), "mixtral", num_attention_heads=4)
    model, _ = load_model(d, progress=False, expert_bits_plan=load_plan(PLAN))
    whole = model.moe_ctx.store
    placement = default_placement(2, 8, 2)  # experts 0-3 on rank 0, 4-7 on rank 1
    stores = [build_ep_store(model, placement, r) for r in range(2)]
    assert sum(s.expert_bytes() for s in stores) == whole.expert_bytes()
    assert stores[0].w13[0].widths == ("full", 8, 4) and stores[1].w13[0].widths == (8, 4)
    for r, store in enumerate(stores):
        for m in range(2):
            mine = placement.experts_on_rank(m, r)
            assert sorted(store.slot_of[m][mine].tolist()) == list(range(len(mine)))
            for got, held in ((store.w13[m], whole.w13[m]), (store.w2[m], whole.w2[m])):
                assert isinstance(got, MixedStack)
                dense, full = got.dequantize(), held.dequantize()
                for e in mine:
                    assert torch.equal(dense[store.slot_of[m][e]], full[whole.slot_of[m][e]]), (r, m, e)
