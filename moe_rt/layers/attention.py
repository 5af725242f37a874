"""Grouped-query attention over a paged KV cache.

Tokens of a forward batch are flattened: T rows, each with its position. Whole prompts being
prefilled come first, back to back; then one new token per decoding sequence. Mixing both in
one forward keeps decoding going while new requests arrive (no prefill-only steps).
The KV cache of a layer is two tensors [num_slots, KV, hd]; slot = block * block_size + offset.

Shape legend: T tokens, B sequences, H query heads, KV key/value heads, hd head dim, D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_rt.models.spec import AttentionSpec

from .linear import Linear
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
    # same for all of them): (cos, sin, rot_sin) [T, 1, hd] rotary tables of the rows' positions.
    rope: tuple[torch.Tensor, ...] | None = None
    # Built by the first layer that asks and reused by the others: decode key slots, decode masks.
    _shared: dict = field(default_factory=dict, repr=False)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lens)

    @property
    def has_decode(self) -> bool:
        return self.block_tables is not None

    def key_slots(self) -> torch.Tensor:
        """Decode: [B, L] cache slot of every key position of each sequence, L = max_blocks *
        block_size (padding blocks point at block 0; decode_mask hides them). Once per forward."""
        slots = self._shared.get("slots")
        if slots is None:
            bs = self.block_size
            offsets = torch.arange(bs, device=self.block_tables.device)
            slots = self._shared["slots"] = (self.block_tables[:, :, None] * bs + offsets).flatten(1)
        return slots

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Decode: additive mask [B, 1, 1, L] (0 where a key is visible, -inf elsewhere), the float
        form scaled_dot_product_attention makes of a boolean mask, built once per forward for each
        window and dtype instead of by every layer."""
        key = ("mask", window, dtype)
        mask = self._shared.get(key)
        if mask is None:
            pos = torch.arange(self.key_slots().shape[1], device=self.block_tables.device)[None, :]
            ctx = self.context_lens[:, None]
            hidden = pos >= ctx if window is None else (pos >= ctx) | (pos < ctx - window)
            mask = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))
            mask = self._shared[key] = mask[:, None, None, :]
        return mask


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
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, hidden, bias=False)
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, eps), RMSNorm(hd, eps)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(self.q_size, eps), RMSNorm(self.kv_size, eps)
        self.rope = rope
        self.window = window

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: LayerKV | None):
        s = self.spec
        T, H, KV, hd = x.shape[0], s.num_heads, s.num_kv_heads, s.head_dim
        qkv = self.qkv_proj(x)
        cs = meta.rope if meta.rope is not None else self.rope.lookup(positions, x.dtype)
        qk_end = self.q_size + self.kv_size
        if s.qk_norm is None:
            if s.clip_qkv is not None:
                qkv = qkv.clamp(-s.clip_qkv, s.clip_qkv)
            # q and k are adjacent columns of qkv: one rotation turns both
            qk = self.rope.rotate(cs, qkv[:, :qk_end].view(T, H + KV, hd))
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, qk_end:].view(T, KV, hd)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            if s.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            if s.clip_qkv is not None:  # after the full-width norms, as OLMoE does
                q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
            q, k, v = q.reshape(T, H, hd), k.reshape(T, KV, hd), v.reshape(T, KV, hd)
            if s.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rope.apply(cs, q, k)
        if kv is not None and meta.slot_mapping is not None:
            kv.k.index_copy_(0, meta.slot_mapping, k)
            kv.v.index_copy_(0, meta.slot_mapping, v)
        P = meta.num_prefill_tokens
        if not P:
            o = self._decode(q, kv, meta)
        elif not meta.has_decode:
            o = self._prefill(q, k, v, meta.prefill_lens)
        else:
            o = torch.cat([self._prefill(q[:P], k[:P], v[:P], meta.prefill_lens), self._decode(q[P:], kv, meta)])
        return self.o_proj(o.reshape(T, self.q_size))

    def _prefill(self, q, k, v, seq_lens: list[int]) -> torch.Tensor:
        return prefill_attention(q, k, v, seq_lens, window=self.window)

    def _decode(self, q, kv: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        """One new token per sequence over its cached keys: q [B, H, hd] -> [B, H, hd]."""
        slots = meta.key_slots()
        k, v = kv.k[slots].transpose(1, 2), kv.v[slots].transpose(1, 2)  # [B, KV, L, hd]
        mask = meta.decode_mask(self.window, q.dtype)
        o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)
        return o[:, :, 0, :]
