"""DeepSpeed-MoE sanity reference: the same MoE layer through `deepspeed.moe.layer.MoE` (ep_size=N,
top-2, no token dropping) and through our baseline all-to-all dispatcher, on the same tokens and
weights, on gloo CPU. Reports the largest output difference and both sides' all-to-all bytes.

    python -m parallel.ds_reference --ranks 2 [--tokens 32] [--hidden 64]

DeepSpeed is optional (pip install deepspeed==0.19.8; DS_ACCELERATOR=cpu is set here). Its
all-to-alls move capacity-padded [E, C, D] buffers (C = the busiest expert's token count, since
no token is dropped); ours move one row per distinct (token, destination rank).

Shape legend: T tokens per rank, D hidden, I expert intermediate, E experts, N ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from moe_rt.errors import MoeRtError


class SwiGLUExpert(nn.Module):
    """One expert in our layout: w13 [2I, D] (gate rows, then up rows), w2 [D, I]."""

    def __init__(self, D: int, I: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(D, 2 * I, bias=False)
        self.w2 = nn.Linear(I, D, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def _weights(E: int, D: int, I: int, seed: int):
    g = torch.Generator().manual_seed(seed)  # the same on every rank
    return (torch.randn(E, D, generator=g) * 0.3, torch.randn(E, 2 * I, D, generator=g) * 0.1,
            torch.randn(E, D, I, generator=g) * 0.1)


def compare(ep, T: int = 32, D: int = 64, I: int = 96, E: int = 8, seed: int = 0) -> dict:
    """On every rank: our baseline MoE output vs DeepSpeed's on this rank's T tokens."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.moe import sharded_moe
    from deepspeed.moe.layer import MoE

    from moe_rt.layers.moe.compute import torch_experts
    from moe_rt.models.spec import RoutingSpec
    from moe_rt.layers.moe.routing import route
    from parallel.apply import EPExpertStore
    from parallel.dispatchers.alltoall import AllToAllDispatcher
    from parallel.dispatchers.comm import Comm
    from parallel.placement import default_placement
    from parallel.stats import EPStats

    N, K = ep.world, 2
    gate_w, w13, w2 = _weights(E, D, I, seed)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1 + ep.rank))

    # -- ours: Mixtral routing (softmax, top-2, renormalised) + all-to-all dispatcher
    spec = RoutingSpec(num_experts=E, top_k=K, norm_topk_prob=True)
    weights, ids = route(F.linear(x, gate_w), spec)
    placement = default_placement(1, E, N)
    mine = placement.experts_on_rank(0, ep.rank)
    slot_of = torch.full((E,), -1)
    slot_of[mine] = torch.arange(len(mine))
    store = EPExpertStore([w13[mine]], [w2[mine]], [slot_of], E)
    stats = EPStats(ep.rank, N, 1, 1)
    disp = AllToAllDispatcher(Comm(ep, stats), placement)
    d = disp.dispatch(0, x, ids, weights)
    ex = store.prepare(0, d.topk_ids)
    ours = disp.combine(0, torch_experts(d.hidden, ex.w13, ex.w2, ex.slots(d.topk_ids), d.topk_weights), d)

    # -- DeepSpeed: its shared-memory op would compile for ~30 s and is not needed for gloo
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (the attribute is torch itself)
    deepspeed.init_distributed(dist_backend="gloo")
    moe = MoE(D, SwiGLUExpert(D, I), num_experts=E, ep_size=N, k=K, drop_tokens=False, use_rts=False,
              top2_2nd_expert_sampling=False, min_capacity=0).eval()
    moe.set_deepspeed_parallelism()  # deepspeed.initialize would do this; we only run inference
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(gate_w)
        for i, e in enumerate(mine):  # DeepSpeed places global expert r * E/N + i on rank r: our default
            moe.deepspeed_moe.experts.deepspeed_experts[i].w13.weight.copy_(w13[e])
            moe.deepspeed_moe.experts.deepspeed_experts[i].w2.weight.copy_(w2[e])
    sent = {"bytes": 0}
    real = sharded_moe.dist.all_to_all_single

    def counting(output, input, *a, **kw):  # equal splits: (N-1)/N of the buffer leaves the rank
        sent["bytes"] += input.numel() * input.element_size() * (N - 1) // N
        return real(output, input, *a, **kw)

    sharded_moe.dist.all_to_all_single = counting
    try:
        with torch.no_grad():
            theirs = moe(x[None])[0][0]
    finally:
        sharded_moe.dist.all_to_all_single = real
    ours_bytes = stats.bytes_by_collective
    return {"rank": ep.rank, "max_abs_diff": float((ours - theirs).abs().max()),
            "output_abs_max": float(ours.abs().max()),
            "ours_a2a_bytes": ours_bytes.get("a2a_dispatch", 0) + ours_bytes.get("a2a_combine", 0),
            "ours_meta_bytes": ours_bytes.get("a2a_meta", 0), "deepspeed_a2a_bytes": sent["bytes"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parallel.ds_reference")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args(argv)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("moe-rt: error: deepspeed is not installed (pip install deepspeed==0.19.8)", file=sys.stderr)
        return 2
    from parallel.launch import launch

    try:
        res = launch(args.ranks, compare, (args.tokens, args.hidden), timeout_s=300)
    except MoeRtError as e:
        print(f"moe-rt: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"per_rank": res,
                      "max_abs_diff": max(r["max_abs_diff"] for r in res),
                      "ours_a2a_bytes": sum(r["ours_a2a_bytes"] for r in res),
                      "deepspeed_a2a_bytes": sum(r["deepspeed_a2a_bytes"] for r in res)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
