"""Grouped-query attention over a paged KV cache.

Tokens of a forward batch are flattened: T rows, each with its position. Whole prompts being
prefilled come first, back to back; then one new token per decoding sequence. Mixing both in
one forward keeps decoding going while new requests arrive (no prefill-only steps).
The KV cache of a layer is two tensors [num_slots, KV, hd]; slot = block * block_size + offset.

Shape legend: T tokens, B sequences, H query heads, KV key/value heads, hd head dim, D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_rt.models.spec import AttentionSpec

from .norm import RMSNorm
from .rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """A forward batch is a prefill part then a decode part (either may be empty):
    rows [0, P) are whole prompts back to back (`prefill_lens`, P = their sum), rows [P, T) one
    new token per decoding sequence (`block_tables`, `context_lens`)."""

    prefill_lens: list[int]  # tokens of each prefilled sequence, in row order
    slot_mapping: torch.Tensor | None = None  # [T] int64 cache slot per row; None = no cache (scoring)
    block_tables: torch.Tensor | None = None  # decode part: [B, max_blocks] int64; None = no decode rows
    block_size: int = 16
    context_lens: torch.Tensor | None = None  # decode part: [B] int64 context length incl. the new token
    # Filled once per forward by the model and shared by every layer (not per layer: it is the
    # same for all of them): rotary tables of `positions`, and the decode key-position grid.
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    key_positions: torch.Tensor | None = None  # decode: [1, max_blocks * block_size]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lens)

    @property
    def has_decode(self) -> bool:
        return self.block_tables is not None


@dataclass
class LayerKV:
    k: torch.Tensor  # [num_slots, KV, hd]; MLA: [num_slots, 1, R + dr], rows [latent | roped k_pe]
    v: torch.Tensor  # [num_slots, KV, hd]; MLA: the view k[..., :R] (values are rebuilt from the latent)

    @classmethod
    def allocate(cls, spec: AttentionSpec, num_slots: int, dtype: torch.dtype, device) -> "LayerKV":
        # Zeroed, not empty: decode attention reads whole blocks (and block 0 as padding) and masks
        # the unused slots, but a masked score still multiplies its value, so uninitialised memory
        # holding NaN/Inf would poison the output (seen with small caches carved from reused heap).
        heads, width = spec.cache_row
        k = torch.zeros(num_slots, heads, width, dtype=dtype, device=device)
        if spec.mla is not None:
            return cls(k, k[..., : spec.mla.kv_lora_rank])
        return cls(k, torch.zeros_like(k))


def prefill_attention(q, k, v, seq_lens: list[int], *, window: int | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Causal attention of whole prompts laid back to back: q [P, H, hd], k [P, KV, hd],
    v [P, KV, hdv] -> [P, H, hdv]. Prompts never share a cache prefix, so each attends only to its
    own new keys; `window` limits how far back a query looks (sliding-window layers)."""
    outs, start = [], 0
    for n in seq_lens:
        qi, ki, vi = (t[start : start + n].transpose(0, 1)[None] for t in (q, k, v))
        if window is not None and n > window:
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, hidden: int, eps: float, rope: RotaryEmbedding, window: int | None):
        super().__init__()
        self.spec = spec
        h, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = h * hd, kv * hd
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, eps), RMSNorm(hd, eps)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(self.q_size, eps), RMSNorm(self.kv_size, eps)
        self.rope = rope
        self.window = window

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: LayerKV | None):
        s = self.spec
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q = q.reshape(T, s.num_heads, s.head_dim)
        k = k.reshape(T, s.num_kv_heads, s.head_dim)
        v = v.reshape(T, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope.apply(meta.rope, q, k) if meta.rope is not None else self.rope(positions, q, k)
        if kv is not None and meta.slot_mapping is not None:
            kv.k.index_copy_(0, meta.slot_mapping, k)
            kv.v.index_copy_(0, meta.slot_mapping, v)
        P = meta.num_prefill_tokens
        parts = []
        if P:
            parts.append(self._prefill(q[:P], k[:P], v[:P], meta.prefill_lens))
        if meta.has_decode:
            parts.append(self._decode(q[P:], kv, meta))
        o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o_proj(o.reshape(T, self.q_size))

    def _prefill(self, q, k, v, seq_lens: list[int]) -> torch.Tensor:
        return prefill_attention(q, k, v, seq_lens, window=self.window)

    def _decode(self, q, kv: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        B, nblk = meta.block_tables.shape
        L = nblk * meta.block_size
        s = self.spec
        k = kv.k.view(-1, meta.block_size, s.num_kv_heads, s.head_dim)[meta.block_tables]
        v = kv.v.view(-1, meta.block_size, s.num_kv_heads, s.head_dim)[meta.block_tables]
        k = k.reshape(B, L, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = v.reshape(B, L, s.num_kv_heads, s.head_dim).transpose(1, 2)
        pos = meta.key_positions if meta.key_positions is not None else torch.arange(L, device=q.device)[None, :]
        ctx = meta.context_lens[:, None]
        mask = pos < ctx
        if self.window is not None:
            mask = mask & (pos >= ctx - self.window)
        o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
        return o[:, :, 0, :]
