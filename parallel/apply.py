"""Apply expert parallelism to a built model (DeepSpeed-MoE inference's scheme), in place.

Per decoder layer, on every rank, with x [T, D] the same on all ranks:

    partial = attention over this rank's heads (input_layernorm(x))      [T, D] partial sums
    h  = x[mine] + reduce_scatter(partial)          full sums, only this rank's tokens [T_r, D]
    h  = h + mlp(post_attention_layernorm(h))       gate on the slice; the dispatcher's
                                                    all-to-all takes pairs to expert owners
    x' = all_gather(h)                              every token everywhere, original order

`mine` comes from the dispatcher's token split: fixed and even for the baseline, chosen per
layer from predicted routing for s-TS. The engine, KV cache and sampler are untouched: each rank
runs the same engine steps on the same requests, and the final all-gather gives every rank the
same hidden states, so logits and sampling agree bit for bit across ranks.

Shape legend: T tokens of the step, T_r this rank's tokens, D hidden, L MoE layers, E experts,
S_r experts this rank holds in a layer, N ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.block import MoEBlock
from moe_rt.layers.moe.store import LayerExperts, ResidentExpertStore
from moe_rt.quant.experts import QuantizedStack
from parallel.dispatchers import DispatcherSetup, EPDispatcher, build_dispatcher
from parallel.dispatchers.comm import Comm, pack_rows, unpack_rows
from parallel.expert_slots import by_part, take_mixed_slots
from parallel.groups import EPGroup
from parallel.placement import ExpertParallelPlacement
from parallel.stats import EPStats
from parallel.tp import check_attention_tp, shard_attention


class EPExpertStore(ResidentExpertStore):
    """Only the experts the placement gives this rank; slot_of maps logical ids to them. The stacks
    are full-precision tensors or QuantizedStacks (expert_bits), as the resident store held them;
    expert_bytes counts what they hold."""

    def __init__(self, w13: list[torch.Tensor | QuantizedStack], w2: list[torch.Tensor | QuantizedStack],
                 slot_of: list[torch.Tensor], num_experts: int) -> None:
        super().__init__(w13, w2)  # [S_r, 2I, D], [S_r, D, I] per layer
        self.slot_of = slot_of  # [E] per layer
        self.num_experts = num_experts

    def prepare(self, moe_index: int, topk_ids: torch.Tensor) -> LayerExperts:
        # The dispatcher only hands this rank ids it holds (others are -1).
        return LayerExperts(self.w13[moe_index], self.w2[moe_index], self.slot_of[moe_index])


def build_ep_store(model, placement: ExpertParallelPlacement, rank: int, reader=None) -> EPExpertStore:
    """Cut (from the resident store) or load (from the checkpoint reader) this rank's experts.

    The resident store comes first: it holds the experts as the model computes with them (in the
    compute dtype, quantized with expert_bits, or at a bits plan's widths), so the rank's experts
    are those very weights.
    The reader is for a model built without experts; it gives full-precision weights only."""
    spec = model.spec
    L, E = len(spec.moe_layer_ids), spec.num_experts
    # Exactly the resident store: an EPExpertStore (EP applied before) indexes slots, not experts.
    old = model.moe_ctx.store if type(model.moe_ctx.store) is ResidentExpertStore else None
    ref = model.embed_tokens.weight
    if old is None and reader is None:
        raise MoeRtError("expert parallelism needs the checkpoint reader or a resident expert store")
    w13s, w2s, slots = [], [], []
    for m in range(L):
        mine = placement.experts_on_rank(m, rank)
        if old is not None:
            # The resident store's slot of each of this rank's experts (a bits plan permutes
            # them), grouped by width part; the rank's slots follow that order.
            at = old.slot_of[m].tolist() if old.slot_of is not None else list(range(E))
            picked = by_part(old.w13[m], [at[e] for e in mine])
            expert_at = {s: e for e, s in enumerate(at)}
            mine = [expert_at[s] for s in picked]
            idx = torch.tensor(picked, dtype=torch.int64, device=ref.device)
            w13s.append(take_mixed_slots(old.w13[m], idx))
            w2s.append(take_mixed_slots(old.w2[m], idx))
        else:
            I, D = spec.moe.intermediate_size, spec.hidden_size
            pairs = [reader.read_expert(spec, m, e) for e in mine]
            w13s.append(torch.stack([p[0] for p in pairs]).to(ref) if pairs else ref.new_empty(0, 2 * I, D))
            w2s.append(torch.stack([p[1] for p in pairs]).to(ref) if pairs else ref.new_empty(0, D, I))
        slot_of = torch.full((E,), -1, dtype=torch.int64, device=ref.device)
        slot_of[mine] = torch.arange(len(mine), device=ref.device)
        slots.append(slot_of)
    return EPExpertStore(w13s, w2s, slots, E)


class EPDecoderLayer(nn.Module):
    """A DecoderLayer's parts driven by the reduce-scatter / all-to-all / all-gather scheme.

    Keeps the original attribute names (self_attn, mlp, ...) so state_dict keys and
    `model.moe_blocks()` see the same modules.
    """

    def __init__(self, layer: nn.Module, layer_id: int, runtime: "EPRuntime") -> None:
        super().__init__()
        self.self_attn = layer.self_attn
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.layer_id = layer_id
        self.moe_index = layer.mlp.moe_index if isinstance(layer.mlp, MoEBlock) else None
        self.runtime = runtime  # plain attribute: not a submodule

    def forward(self, x, positions, meta, kv) -> torch.Tensor:
        rt = self.runtime
        mark = rt.stats.layer_start(x.device)
        T, D = x.shape
        if self.layer_id == 0:
            rt.stats.tokens += T
            rt.stats.steps += 1
        split = rt.dispatcher.token_split(self.moe_index, T, x.device)
        partial = self.self_attn(self.input_layernorm(x), positions, meta, kv)
        mine = split.owned(rt.ep.rank)
        h = x[mine] + rt.comm.reduce_scatter(partial, split.order, split.counts)
        h = h + self.mlp(self.post_attention_layernorm(h))
        side = rt.dispatcher.side_columns(self.moe_index, h) if self.moe_index is not None else None
        row = D * h.element_size()
        if side is None:
            out = rt.comm.all_gather(h, split.order, split.counts, {"all_gather": row})
        else:
            # The next layer's routing guesses ride on this all-gather (one message, not two).
            K = side.shape[1]
            both = rt.comm.all_gather(pack_rows(h, side), split.order, split.counts,
                                      {"all_gather": row, "predict_side": 4 * K})
            out, cols = unpack_rows(both, [(h.dtype, D), (torch.int32, K)])
            rt.dispatcher.accept_side(self.moe_index, cols)
        rt.stats.layer_end(self.layer_id, mark)  # on CUDA: events, read later (no sync per layer)
        return out


@dataclass
class EPRuntime:
    """What apply_expert_parallel installed; reachable from the LLM built by moe_rt_app/ep_llm.py."""

    ep: EPGroup
    placement: ExpertParallelPlacement
    dispatcher: EPDispatcher
    comm: Comm
    stats: EPStats

    def moe_stats(self) -> dict:
        """This rank's counters (see parallel/stats.py for the group view)."""
        return self.stats.as_dict()


def apply_expert_parallel(model, group: EPGroup, placement: ExpertParallelPlacement,
                          dispatcher_kind: str | type[EPDispatcher] = "alltoall", predictor=None, *,
                          reader=None, slack: float = 0.25) -> EPRuntime:
    """Shard attention heads, keep only this rank's experts and drive every layer with the EP scheme.

    dispatcher_kind: a name in parallel.dispatchers.DISPATCHERS, or any class satisfying EPDispatcher.

    Call on every rank with the same arguments after the model is built. The caller must also give
    the engine a KV cache with this rank's heads (tp.shard_kv_cache; moe_rt_app/ep_llm.py does it).
    """
    spec = model.spec
    L, E, N = len(spec.moe_layer_ids), spec.num_experts, group.world
    if placement.ranks != N:
        raise MoeRtError(f"the placement is for {placement.ranks} ranks but the group has {N}")
    placement.validate_against(L, E)
    a = spec.attention
    check_attention_tp(a, N)
    if predictor == "residual_gate":
        from parallel.dispatchers.speculative import ResidualGate

        blocks = [layer for layer in model.layers if isinstance(layer.mlp, MoEBlock)]
        predictor = ResidualGate([b.post_attention_layernorm for b in blocks], [b.mlp.gate for b in blocks])
    stats = EPStats(group.rank, N, L, spec.num_layers)
    comm = Comm(group, stats)
    dispatcher = build_dispatcher(dispatcher_kind, DispatcherSetup(comm, placement, group.device, predictor, slack))
    runtime = EPRuntime(group, placement, dispatcher, comm, stats)
    model.moe_ctx.store = build_ep_store(model, placement, group.rank, reader)
    model.moe_ctx.dispatcher = dispatcher
    for i, layer in enumerate(model.layers):
        shard_attention(layer.self_attn, group.rank, N)
        model.layers[i] = EPDecoderLayer(layer, i, runtime)
    return runtime
