"""The expert-parallel dispatch contract: every registered scheme satisfies EPDispatcher and, on one
rank, is the identity routing; and a scheme written here, one class, runs the EP engine on 2 gloo
ranks and equals the single-process engine."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch

from checkpoints import write_checkpoint
from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.compute import torch_experts
from moe_rt.layers.moe.dispatch import DispatchOutput, Dispatcher
from moe_rt.sampling_params import SamplingParams
from parallel.dispatchers import (DISPATCHERS, DispatcherSetup, EPDispatcher, EvenSplitDispatcher,
                                  build_dispatcher)
from parallel.dispatchers.comm import pack_rows, unpack_rows
from parallel.launch import launch


@dataclass(frozen=True)
class AllGatherHandle:
    counts: list[int]  # [N] tokens each rank gave dispatch; this rank's results are its slice


class AllGatherDispatcher(EvenSplitDispatcher):
    """Every rank sees every token and computes the pairs whose expert's primary copy it holds;
    the partial sums are reduce-scattered back to the tokens' ranks. More bytes than all-to-all,
    but no dedup tables: the simplest correct scheme."""

    kind = "allgather"

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchOutput[AllGatherHandle]:
        N, (T_r, K), D = self.comm.world, topk_ids.shape, hidden.shape[1]
        counts = self.comm.exchange_counts([T_r] * N)  # every rank's token count
        order = torch.arange(sum(counts), device=hidden.device)
        rows = pack_rows(hidden, topk_ids.to(torch.int32), topk_weights.float())
        every = self.comm.all_gather(rows, order, counts, {"ag_dispatch": D * hidden.element_size() + 8 * K})
        h, ids, w = unpack_rows(every, [(hidden.dtype, D), (torch.int32, K), (torch.float32, K)])
        primary = torch.as_tensor(self.placement.primary_table()[moe_index], device=h.device)  # [E]
        ids = ids.long()
        mine = torch.where(primary[ids] == self.comm.rank, ids, torch.full_like(ids, -1))
        return DispatchOutput(h, mine, w, AllGatherHandle(counts))

    def combine(self, moe_index: int, expert_out: torch.Tensor,
                dispatched: DispatchOutput[AllGatherHandle]) -> torch.Tensor:
        counts = dispatched.handle.counts
        order = torch.arange(sum(counts), device=expert_out.device)
        return self.comm.reduce_scatter(expert_out, order, counts)


ALL = {**DISPATCHERS, AllGatherDispatcher.kind: AllGatherDispatcher}


def one_rank_setup(L=2, E=8):
    from parallel.dispatchers.comm import Comm
    from parallel.groups import EPGroup
    from parallel.placement import default_placement
    from parallel.stats import EPStats

    comm = Comm(EPGroup(0, 1, None, torch.device("cpu")), EPStats(0, 1, L, L))
    guess = lambda m, layer_out: torch.zeros(layer_out.shape[0], E)  # noqa: E731 (s-TS's guess source)
    return DispatcherSetup(comm, default_placement(L, E, 1), predictor=guess)


def public_signature(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("kind", list(ALL))
def test_every_scheme_satisfies_the_contract(kind):
    cls = ALL[kind]
    assert cls.kind == kind
    d = build_dispatcher(cls if kind not in DISPATCHERS else kind, one_rank_setup())
    assert type(d) is cls
    assert isinstance(d, EPDispatcher) and isinstance(d, Dispatcher)
    # runtime_checkable only checks that the names exist: the parameters must match too.
    for name in ("dispatch", "combine", "token_split", "side_columns", "accept_side", "build"):
        assert public_signature(getattr(cls, name)) == public_signature(getattr(EPDispatcher, name)), name
    # On one rank every expert is here: dispatch/compute/combine is the local routing.
    g = torch.Generator().manual_seed(3)
    T, D, I, E, K = 9, 8, 6, 8, 2
    x, w = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    assert d.token_split(1, T).counts == [T]
    out = d.dispatch(1, x, ids, w)
    assert isinstance(out, DispatchOutput)
    y = torch_experts(out.hidden, w13, w2, out.topk_ids, out.topk_weights)
    torch.testing.assert_close(d.combine(1, y, out), torch_experts(x, w13, w2, ids, w))


def test_the_registry_is_read_only_and_names_its_schemes():
    assert set(DISPATCHERS) == {"alltoall", "speculative"}
    with pytest.raises(TypeError):
        DISPATCHERS["allgather"] = AllGatherDispatcher  # a scheme is added in the package, not at run time
    with pytest.raises(MoeRtError, match="unknown EP dispatcher 'ring' \\(choose alltoall, speculative\\)"):
        build_dispatcher("ring", one_rank_setup())


PROMPTS = [[5, 17, 42, 9, 77, 3, 12], [101, 7, 64], [33, 8, 250, 19, 4]]
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
SCORED = [5, 17, 42, 9, 77, 3, 12, 60, 61]


def run_allgather(ep, model_dir):
    from moe_rt_app.ep_llm import EPOptions, build_ep_llm
    from parallel.placement import ExpertParallelPlacement

    # Experts 1 and 5 have a copy on both ranks: each pair must still be computed once.
    layer = {0: [0], 1: [1, 0], 2: [1], 3: [0], 4: [1], 5: [0, 1], 6: [0], 7: [1]}
    placement = ExpertParallelPlacement(ranks=2, layers={m: layer for m in range(2)})
    llm = build_ep_llm(model_dir, ep, EPOptions(AllGatherDispatcher, placement), dtype="float32", max_num_seqs=4)
    rt = llm.runtime
    assert type(rt.dispatcher) is AllGatherDispatcher and llm.llm.model.moe_ctx.dispatcher is rt.dispatcher
    toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
    return toks, llm.prompt_logits(SCORED), llm.moe_stats()


def test_a_new_scheme_runs_the_ep_engine(tmp_path):
    from moe_rt_app import LLM

    model_dir = str(write_checkpoint(tmp_path, "mixtral", num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, num_local_experts=8))
    ref = LLM(model_dir, dtype="float32", device="cpu", progress=False, max_num_seqs=4)
    ref_toks = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, PARAMS)]
    ref_logits = ref.prompt_logits(SCORED)
    for toks, logits, stats in launch(2, run_allgather, (model_dir,), timeout_s=180):
        assert toks == ref_toks
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
        # Tokens travelled through this scheme's collective, not the all-to-all.
        assert stats["bytes_by_collective"]["ag_dispatch"] > 0
        assert "a2a_dispatch" not in stats["bytes_by_collective"]
