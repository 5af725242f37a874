"""Attention tensor parallelism, applied to a built model (the model code knows nothing of it).

Each of N ranks keeps H/N query heads and KV/N key/value heads: rows of the fused qkv_proj
[(H + 2 KV) hd, D] and the matching columns of o_proj [D, H hd]. The o_proj output is then a
partial sum over this rank's heads; the layer driver (apply.py) reduce-scatters it.

Contiguous head blocks keep grouped-query pairing intact: query head i reads KV head
i // (H / KV), and rank r's query heads [r H/N, (r+1) H/N) read exactly its KV heads
[r KV/N, (r+1) KV/N).

Shape legend: H query heads, KV key/value heads, hd head dim, D hidden, N ranks.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moe_rt.errors import MoeRtError
from moe_rt.layers.attention import Attention, LayerKV
from moe_rt.models.spec import AttentionSpec


def check_tp(num_heads: int, num_kv_heads: int, qk_norm: str, world: int) -> None:
    if num_heads % world or num_kv_heads % world:
        raise MoeRtError(f"attention tensor parallelism over {world} ranks needs heads ({num_heads}) "
                         f"and KV heads ({num_kv_heads}) divisible by {world}")
    if qk_norm == "full" and world > 1:
        raise MoeRtError("attention tensor parallelism does not support a q/k norm over the whole "
                         "projection (OLMoE); it would need an all-reduce inside attention")


def check_attention_tp(a: AttentionSpec, world: int) -> None:
    """check_tp for a model's attention; MLA is refused: its cache is one latent row shared by all
    heads and its heads are rebuilt from it by kv_b_proj, which this head-row slicing does not handle."""
    if a.mla is not None and world > 1:
        raise MoeRtError("expert parallelism (--ep) shards attention heads, which MLA attention "
                         "(DeepSeek-V2/V3) does not support yet; run without --ep")
    check_tp(a.num_heads, a.num_kv_heads, a.qk_norm, world)


@torch.no_grad()
def shard_attention(attn: Attention, rank: int, world: int) -> None:
    """Keep this rank's heads of one attention module, in place."""
    s = attn.spec
    check_tp(s.num_heads, s.num_kv_heads, s.qk_norm, world)
    if world == 1:
        return
    hd = s.head_dim
    qn, kvn = s.num_heads // world * hd, s.num_kv_heads // world * hd
    q0, k0, v0 = rank * qn, attn.q_size + rank * kvn, attn.q_size + attn.kv_size + rank * kvn
    rows = torch.cat([torch.arange(q0, q0 + qn), torch.arange(k0, k0 + kvn), torch.arange(v0, v0 + kvn)])
    old = attn.qkv_proj
    qkv = nn.Linear(old.in_features, rows.numel(), bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    qkv.weight.copy_(old.weight[rows.to(old.weight.device)])
    if old.bias is not None:
        qkv.bias.copy_(old.bias[rows.to(old.bias.device)])
    o = attn.o_proj
    o_new = nn.Linear(qn, o.out_features, bias=False, device=o.weight.device, dtype=o.weight.dtype)
    o_new.weight.copy_(o.weight[:, q0:q0 + qn])
    attn.qkv_proj, attn.o_proj = qkv, o_new
    attn.spec = dataclasses.replace(s, num_heads=s.num_heads // world, num_kv_heads=s.num_kv_heads // world)
    attn.q_size, attn.kv_size = qn, kvn


def shard_kv_cache(kv: list[LayerKV], world: int) -> list[LayerKV]:
    """Per-rank paged KV cache: the same slots, KV/N heads each (a rank stores only its heads)."""
    if world == 1:
        return kv
    out = []
    for layer in kv:
        slots, heads, hd = layer.k.shape
        if heads % world:
            raise MoeRtError(f"KV cache with {heads} heads cannot be split over {world} ranks")
        shape = (slots, heads // world, hd)
        # Zeroed, as LayerKV.allocate: decode masks unused slots, but a masked NaN still poisons
        # the output, and uninitialised memory may hold NaN.
        out.append(LayerKV(torch.zeros(shape, dtype=layer.k.dtype, device=layer.k.device),
                           torch.zeros(shape, dtype=layer.v.dtype, device=layer.v.device)))
    return out
