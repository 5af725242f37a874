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
