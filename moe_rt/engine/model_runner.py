"""Turns scheduled sequences into one flattened forward batch over the paged KV cache.

Shape legend: T tokens in the step, B sequences, V vocabulary, KV key/value heads, hd head dim.
"""
from __future__ import annotations

import torch

from moe_rt.layers.attention import AttentionMetadata, LayerKV
from moe_rt.layers.moe.events import BatchInfo
from moe_rt.models.model import MoEForCausalLM

from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        a = model.spec.attention
        slots = num_blocks * block_size
        # Zeroed, not empty: decode attention reads whole blocks (and block 0 as padding) and masks
        # the unused slots, but a masked score still multiplies its value, so uninitialised memory
        # holding NaN/Inf would poison the output (seen with small caches carved from reused heap).
        self.kv = [
            LayerKV(
                torch.zeros(slots, a.num_kv_heads, a.head_dim, dtype=dtype, device=device),
                torch.zeros(slots, a.num_kv_heads, a.head_dim, dtype=dtype, device=device),
            )
            for _ in range(model.spec.num_layers)
        ]
        self.step_count = 0

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _prepare_prefill(self, seqs: list[Sequence]):
        ids, pos, slots, lens = [], [], [], []
        for s in seqs:
            n = len(s)
            ids.extend(s.token_ids)
            pos.extend(range(n))
            slots.extend(self._slot(s, p) for p in range(n))
            lens.append(n)
        meta = AttentionMetadata(True, lens, self._t(slots), block_size=self.block_size)
        return self._t(ids), self._t(pos), meta

    def _prepare_decode(self, seqs: list[Sequence]):
        ids = [s.token_ids[-1] for s in seqs]
        pos = [len(s) - 1 for s in seqs]
        slots = [self._slot(s, len(s) - 1) for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        # Padding entries point at block 0; the context-length mask hides them.
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        lens = [len(s) for s in seqs]
        meta = AttentionMetadata(
            False, lens, self._t(slots), self._t(tables), self.block_size, self._t(lens)
        )
        return self._t(ids), self._t(pos), meta

    def _t(self, x) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Forward one step; returns logits [B, V] of each sequence's last position."""
        ids, pos, meta = self._prepare_prefill(seqs) if is_prefill else self._prepare_decode(seqs)
        hub = self.model.hub
        if hub.active:
            seq_ids = torch.cat([torch.full((n,), s.seq_id) for s, n in zip(seqs, meta.seq_lens)]) if is_prefill \
                else torch.tensor([s.seq_id for s in seqs])
            hub.batch = BatchInfo(self.step_count, seq_ids, pos.cpu(), ids.cpu())
        self.step_count += 1
        hidden = self.model(ids, pos, meta, self.kv)
        if is_prefill:
            last = torch.tensor(meta.seq_lens, device=self.device).cumsum(0) - 1
            hidden = hidden[last]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n, V] of every prompt position, without touching the KV cache."""
        ids = self._t(token_ids)
        meta = AttentionMetadata(True, [len(token_ids)])
        self.model.hub.batch = None  # a scoring pass belongs to no engine step: observers must not file it under one
        return self.model.compute_logits(self.model(ids, torch.arange(len(token_ids), device=self.device), meta, None))
