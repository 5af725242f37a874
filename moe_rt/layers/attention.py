"""Grouped-query attention over a paged KV cache.

Tokens of a forward batch are flattened: T rows, each with its position. Whole prompts being
prefilled come first, back to back; then one new token per decoding sequence. Mixing both in
one forward keeps decoding going while new requests arrive (no prefill-only steps).
The KV cache of a layer is two tensors [num_slots, KV, hd]; slot = block * block_size + offset.

Shape legend: T tokens, B sequences, H query heads, KV key/value heads, hd head dim, D hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_rt.models.spec import AttentionSpec

from .linear import Linear, linear
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
    # same for all of them): RotaryEmbedding.lookup's tables of the rows' positions.
    rope: tuple[torch.Tensor, ...] | None = None
    # Built by the first layer that asks and reused by the others: decode key rows, decode masks.
    _shared: dict = field(default_factory=dict, repr=False)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lens)

    @property
    def has_decode(self) -> bool:
        return self.block_tables is not None

    def decode_mask(self, window: int | None, dtype: torch.dtype, kv_heads: int = 1) -> torch.Tensor:
        """Decode: additive mask [B * kv_heads, 1, L] (0 where a key is visible, -inf elsewhere),
        row b * kv_heads + h for head h of sequence b (key_rows' batches), the float form
        scaled_dot_product_attention makes of a boolean mask; built once per forward for each
        window, dtype and head count instead of by every layer."""
        key = ("mask", window, dtype, kv_heads)
        mask = self._shared.get(key)
        if mask is None:
            B, nb = self.block_tables.shape
            L = nb * self.block_size
            pos = torch.arange(L, device=self.block_tables.device)
            c = self.context_lens
            ctx = c.as_strided((B, kv_heads, 1), (c.stride(0), 0, 0), c.storage_offset())  # per (sequence, head)
            hidden = pos >= ctx if window is None else (pos >= ctx) | (pos < ctx - window)
            mask = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))
            mask = self._shared[key] = mask.view(B * kv_heads, 1, L)
        return mask

    def key_rows(self, kv_heads: int) -> torch.Tensor:
        """Decode: [B * KV, L] row of a cache viewed as [num_slots * KV, hd] holding key position l
        of sequence b, head h at row b * KV + h (that is slot * KV + h; padding blocks point at
        block 0, decode_mask hides them): one index gathers the keys (or values) of every sequence
        straight into the [B * KV, L, hd] batches decode attention multiplies. Once per forward."""
        key = ("rows", kv_heads)
        rows = self._shared.get(key)
        if rows is None:
            bs, t = self.block_size, self.block_tables
            B, nb = t.shape
            # block * bs * KV + (offset * KV + head), as [B, KV, nb, bs], written into a contiguous
            # tensor: left to itself the add would lay heads innermost (within's strides), and the
            # gathered keys follow the layout of their index
            within = torch.arange(bs * kv_heads, device=t.device).as_strided((kv_heads, 1, bs), (1, 0, kv_heads))
            blocks = t.as_strided((B, 1, nb, 1), (t.stride(0), 0, t.stride(1), 0), t.storage_offset())
            rows = torch.empty((B, kv_heads, nb, bs), dtype=t.dtype, device=t.device)
            torch.add(within, blocks, alpha=bs * kv_heads, out=rows)
            rows = self._shared[key] = rows.view(B * kv_heads, nb * bs)
        return rows

    def key_index(self, kv_heads: int) -> torch.Tensor:
        """key_rows flattened, [B * KV * L]: the index of index_select (which gathers whole rows
        in about half the time of indexing by the 2-D key_rows, and faster than torch.gather as
        the rows grow). Once per forward."""
        key = ("flat", kv_heads)
        index = self._shared.get(key)
        if index is None:
            index = self._shared[key] = self.key_rows(kv_heads).view(-1)
        return index


@dataclass
class LayerKV:
    k: torch.Tensor  # [num_slots, KV, hd]; MLA: [num_slots, 1, R + dr], rows [latent | roped k_pe]
    v: torch.Tensor  # [num_slots, KV, hd]; MLA: the view k[..., :R] (values are rebuilt from the latent)

    def __post_init__(self) -> None:
        # [num_slots * KV, hd] views decode attention gathers rows from (AttentionMetadata.key_rows),
        # made once here instead of by every layer in every step; None for MLA's strided v
        self.k_rows = self.k.view(-1, self.k.shape[-1])
        self.v_rows = self.v.view(-1, self.v.shape[-1]) if self.v.is_contiguous() else None
        # [num_slots, KV * hd]: whole slots, gathered with index_select (on the CPU 1.5-5x faster
        # than advanced indexing by a [B, L] index)
        self.k_slots = self.k.view(self.k.shape[0], -1)
        self.v_slots = self.v.view(self.v.shape[0], -1) if self.v.is_contiguous() else None

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


def _heads(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Heads [start, start + n) of x [T, N, hd], as one as_strided view."""
    T, _, hd = x.shape
    return x.as_strided((T, n, hd), x.stride(), x.storage_offset() + start * x.stride(1))


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
        # one decode row is only viewed and read below (no norms): it may stay a strided view
        qkv = linear(x, self.qkv_proj.weight, self.qkv_proj.bias, contiguous=s.qk_norm != "none")
        cs = meta.rope if meta.rope is not None else self.rope.lookup(positions, x.dtype)
        if s.qk_norm == "none":
            if s.clip_qkv is not None:
                qkv = qkv.clamp(-s.clip_qkv, s.clip_qkv)
            # q and k are adjacent heads of qkv: one rotation turns both; every part is a view of
            # one as_strided op (slices and views would take two or three each)
            heads = qkv.view(T, H + 2 * KV, hd)
            qk = self.rope.rotate(cs, heads, H + KV)
            q, k, v = _heads(qk, 0, H), _heads(qk, H, KV), _heads(heads, H + KV, KV)
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
            return self.o_proj(self._decode(q, kv, meta))
        if not meta.has_decode:
            o = self._prefill(q, k, v, meta.prefill_lens)
        else:
            o = torch.cat([self._prefill(q[:P], k[:P], v[:P], meta.prefill_lens).reshape(P, self.q_size),
                           self._decode(q[P:], kv, meta)])
        return self.o_proj(o.reshape(T, self.q_size))

    def _prefill(self, q, k, v, seq_lens: list[int]) -> torch.Tensor:
        return prefill_attention(q, k, v, seq_lens, window=self.window)

    def _decode(self, q, kv: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        """One new token per sequence over its cached keys: q [B, H, hd] -> [B, H * hd]."""
        B, H, hd = q.shape
        if B > 1:
            # Keys gathered slot by slot (KV * hd values per row) and read by SDPA where they land,
            # transposed: at 16 sequences that is ~2.5x faster than gathering them head by head
            # into the layout the batched matmuls below need (mixtral-56m, one thread). One
            # sequence is the other way round: its per-head gather costs less than what the
            # matmuls lose reading keys strided by KV * hd (L = 256: 113 vs 185 us per layer).
            L = meta.key_rows(1).shape[1]  # one head: its rows are the slots
            KV = kv.k.shape[1]
            k, v = (torch.index_select(t, 0, meta.key_index(1)).view(B, L, KV, hd).transpose(1, 2)
                    for t in (kv.k_slots, kv.v_slots))  # [B, KV, L, hd]
            mask = meta.decode_mask(self.window, q.dtype).view(B, 1, 1, L)
            o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)
            return o.reshape(B, H * hd)
        return self._decode_one(q, kv, meta)

    def _decode_one(self, q, kv: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
        """_decode for one sequence (any batch gives the same result; the engine sends one),
        as two batched matmuls over its KV heads rather than scaled_dot_product_attention: the
        keys and values are gathered by one index_select each straight into the [B * KV, L, hd] layout
        the matmuls read, and the query heads of a KV head are the rows of its batch (grouped-query
        attention without repeating keys). 14 aten ops where SDPA with its gather, transposes and
        unsqueezes took ~40, at the same speed. The arithmetic is SDPA's CPU kernel's: q.k, times
        the scale, plus the additive mask, softmax, times v (the softmax in one pass instead of
        its blocked online form, so the last bits may differ from it)."""
        B, H, hd = q.shape
        KV = kv.k.shape[1]
        L = meta.key_rows(KV).shape[1]
        index = meta.key_index(KV)
        k, v = (torch.index_select(t, 0, index).view(B * KV, L, hd) for t in (kv.k_rows, kv.v_rows))
        # one sequence's query heads are contiguous: a view; several: a copy (B * KV batches)
        q = q.view(B * KV, H // KV, hd) if q.is_contiguous() else q.reshape(B * KV, H // KV, hd)
        # k transposed, as one as_strided view of the gathered rows (contiguous, as key_rows is)
        kt = k.as_strided((B * KV, hd, L), (L * hd, 1, hd)) if k.is_contiguous() else k.transpose(1, 2)
        scores = torch.bmm(q, kt)
        # mask + scale * scores in one op: exactly scores * scale (+0 or -inf)
        scores = torch.add(meta.decode_mask(self.window, q.dtype, KV), scores, alpha=1.0 / math.sqrt(hd))
        # aten's softmax kernel itself (torch.softmax dispatches a wrapper op around it)
        return torch.bmm(torch._softmax(scores, -1, False), v).view(B, H * hd)
