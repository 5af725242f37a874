"""The decode step's attention, rope and norm written in few ops, each against the plain form it
replaces: scaled_dot_product_attention over the gathered keys, rotate_half, F.rms_norm."""
import pytest
import torch
import torch.nn.functional as F

from moe_rt.layers.attention import Attention, AttentionMetadata, LayerKV
from moe_rt.layers.norm import RMSNorm
from moe_rt.layers.rotary import RotaryEmbedding
from moe_rt.models.spec import AttentionSpec

BS = 4  # block size


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _metadata(ctx: list[int], width: int, gen: torch.Generator) -> AttentionMetadata:
    """Decode rows of len(ctx) sequences with random distinct blocks; tables padded with block 0."""
    blocks = (torch.randperm(40, generator=gen)[: len(ctx) * width] + 1).view(len(ctx), width)
    for b, n in enumerate(ctx):
        blocks[b, -(-n // BS):] = 0
    lens = torch.tensor(ctx)
    slots = blocks[torch.arange(len(ctx)), (lens - 1) // BS] * BS + (lens - 1) % BS
    return AttentionMetadata([], slot_mapping=slots, block_tables=blocks, block_size=BS, context_lens=lens)


def _reference(q, kv: LayerKV, meta: AttentionMetadata, window):
    """SDPA over each sequence's visible keys, gathered slot by slot."""
    out = []
    for b, n in enumerate(meta.context_lens.tolist()):
        slots = torch.stack([meta.block_tables[b, p // BS] * BS + p % BS for p in range(n)])
        if window is not None:  # key p is visible when ctx - window <= p < ctx
            slots = slots[torch.arange(n) >= n - window]
        k, v = kv.k[slots].transpose(0, 1), kv.v[slots].transpose(0, 1)  # [KV, visible, hd]
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, enable_gqa=True)[:, 0])
    return torch.stack(out).flatten(1)


@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("ctx, window, width",
                         [([3], None, 1), ([7], None, 4), ([1, 9, 5], None, 4), ([3, 12, 8], 5, 4)])
def test_decode_attention_matches_sdpa_over_the_gathered_keys(heads, kv_heads, ctx, window, width):
    gen = torch.Generator().manual_seed(len(ctx) * 10 + heads + kv_heads)
    hd = 8
    spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=hd)
    attn = Attention(spec, 16, 1e-6, RotaryEmbedding(hd, 64, 10000.0), window)
    kv = LayerKV.allocate(spec, 41 * BS, torch.float32, "cpu")
    kv.k.normal_(generator=gen)
    kv.v.normal_(generator=gen)
    meta = _metadata(ctx, width, gen)
    q = torch.randn(len(ctx), heads, hd, generator=gen)
    ref = _reference(q, kv, meta, window)
    for got in (attn._decode(q, kv, meta), attn._decode_one(q, kv, meta)):  # the engine's path, the batched matmuls
        assert got.shape == (len(ctx), heads * hd)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the gather index is laid out contiguously: the keys it gathers are, and decode reads them so
    rows = meta.key_rows(kv_heads)
    assert rows.is_contiguous()
    slot = rows // kv_heads
    assert torch.equal(rows % kv_heads, torch.arange(kv_heads).repeat(len(ctx))[:, None].expand_as(rows))
    for b in range(len(ctx)):
        want = (meta.block_tables[b, :, None] * BS + torch.arange(BS)).flatten()
        assert torch.equal(slot[b * kv_heads], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_rotate_half_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(16, 512, 10000.0)
    pos = torch.randint(0, 512, (5,), generator=gen)
    cos, sin, _ = cs = rope.lookup(pos, dtype)
    x = (torch.randn(5, 7, 16, generator=gen) * 4).to(dtype)
    assert torch.equal(rope.rotate(cs, x), x * cos + _rotate_half(x) * sin)
    # the first heads of a wider, strided tensor (how attention passes q and k out of qkv)
    wide = (torch.randn(5, 10, 16, generator=gen) * 4).to(dtype)
    got = rope.rotate(cs, wide, 6)
    assert got.shape == (5, 6, 16) and got.is_contiguous()
    assert torch.equal(got, wide[:, :6] * cos + _rotate_half(wide[:, :6]) * sin)


def test_rms_norm_fp32_is_f_rms_norm_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    for dim, rows in ((192, 1), (256, 3), (7, 16)):
        norm = RMSNorm(dim, 1e-5)
        norm.weight.data = torch.randn(dim, generator=gen)
        x = torch.randn(rows, dim, generator=gen) * 10
        assert torch.equal(norm(x), F.rms_norm(x, (dim,), norm.weight, 1e-5))
