"""Multi-head Latent Attention (DeepSeek-V2/V3) over the paged KV cache.

Per token, one latent c = kv_a_layernorm(kv_a_proj_with_mqa(x)[:R]) and one rotary key
k_pe = rope(kv_a_proj_with_mqa(x)[R:]) are shared by all heads; kv_b_proj (W_uk | W_uv per head)
turns c into each head's k_nope and v. The cache keeps only the row [c | k_pe] (R + dr values,
vs 2 * H * hd for standard attention): the layer's LayerKV.k is [num_slots, 1, R + dr] and
LayerKV.v is a view of its first R columns (values come from the latent), so no byte is stored twice.

Prefill decompresses the new tokens' latents into per-head K/V and runs causal attention, as the
reference does. Decode absorbs W_uk into the query and W_uv into the output instead of
decompressing the context: q_nope . (W_uk c) == (W_uk^T q_nope) . c, so each step attends over
the cached [c | k_pe] rows directly (one shared "KV head" of width R + dr), and the cost of a
decode step no longer includes an R x H(dn + dv) product for every context token, which would
grow with the context and dominate long decodes (the same choice as DeepSeek's own inference code).

Shape legend: T tokens, B decoding sequences, L context slots, H heads, R kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, D hidden.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_rt.models.spec import AttentionSpec

from .attention import AttentionMetadata, LayerKV, prefill_attention
from .linear import Linear
from .norm import RMSNorm
from .rotary import RotaryEmbedding


class MLAttention(nn.Module):
    """Attribute names are the Hugging Face tensor names (self_attn.<name>.weight), so the loader
    copies every parameter by its own name."""

    def __init__(self, spec: AttentionSpec, hidden: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        m = self.mla = spec.mla
        self.spec = spec
        H, bias = spec.num_heads, m.attention_bias
        if m.q_lora_rank is None:
            self.q_proj = Linear(hidden, H * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, m.q_lora_rank, bias=bias)
            # eps 1e-6, not rms_norm_eps: DeepSeek's code (and transformers) build both latent norms
            # with the RMSNorm default
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(m.q_lora_rank, H * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = Linear(H * m.v_head_dim, hidden, bias=bias)
        self.rope = rope

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: LayerKV | None):
        m, H, T = self.mla, self.spec.num_heads, x.shape[0]
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(T, H, m.qk_head_dim).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cs = meta.rope if meta.rope is not None else self.rope.lookup(positions, x.dtype)
        rotate = self.rope.apply_interleaved if m.rope_interleave else self.rope.apply
        q_pe, k_pe = rotate(cs, q_pe, k_pe[:, None, :])  # [T, H, dr], [T, 1, dr]
        if kv is not None and meta.slot_mapping is not None:
            kv.k.index_copy_(0, meta.slot_mapping, torch.cat([latent[:, None, :], k_pe], dim=-1))
        P = meta.num_prefill_tokens
        parts = []
        if P:
            parts.append(self._prefill(q_nope[:P], q_pe[:P], latent[:P], k_pe[:P], meta.prefill_lens))
        if meta.has_decode:
            parts.append(self._decode(q_nope[P:], q_pe[P:], kv, meta))
        o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o_proj(o.reshape(T, H * m.v_head_dim))

    def _w_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj as per-head W_uk [H, dn, R] and W_uv [H, dv, R]."""
        m = self.mla
        w = self.kv_b_proj.weight.view(self.spec.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return w[:, : m.qk_nope_head_dim], w[:, m.qk_nope_head_dim :]

    def _prefill(self, q_nope, q_pe, latent, k_pe, seq_lens: list[int]) -> torch.Tensor:
        """Decompress the new tokens' latents and attend causally within each prompt -> [P, H, dv]."""
        m, H = self.mla, self.spec.num_heads
        P = latent.shape[0]
        k_nope, v = self.kv_b_proj(latent).view(P, H, -1).split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(P, H, m.qk_rope_head_dim)], dim=-1)
        return prefill_attention(q, k, v, seq_lens, scale=m.softmax_scale)

    def _decode(self, q_nope, q_pe, kv: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        """Absorbed attention of one new token per sequence over its cached rows -> [B, H, dv]."""
        m = self.mla
        B, nblk = meta.block_tables.shape
        L = nblk * meta.block_size
        w_uk, w_uv = self._w_kv()
        q = torch.cat([torch.einsum("bhd,hdr->bhr", q_nope, w_uk), q_pe], dim=-1)  # [B, H, R + dr]
        rows = torch.index_select(kv.k_slots, 0, meta.key_index(1)).view(B, 1, L, -1)  # one head: rows are slots
        mask = meta.decode_mask(None, q.dtype).view(B, 1, 1, L)
        # All H query heads share the one latent head (enable_gqa); values are the latent itself.
        o = F.scaled_dot_product_attention(
            q[:, :, None, :], rows, rows[..., : m.kv_lora_rank], attn_mask=mask, scale=m.softmax_scale, enable_gqa=True
        )
        return torch.einsum("bhr,hvr->bhv", o[:, :, 0, :], w_uv)
