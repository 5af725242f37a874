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
        slots = num_blocks * block_size
        self.kv = [LayerKV.allocate(model.spec.attention, slots, dtype, device) for _ in range(model.spec.num_layers)]
        self.step_count = 0

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _prepare(self, prefill: list[Sequence], decode: list[Sequence]):
        """Rows: every prefilled sequence's whole token list, then each decoding sequence's last token.
        Every integer the step needs (ids, positions, slots, context lengths, block tables) goes to
        the device as one tensor; the parts are views of it."""
        ids, pos, slots, seq_rows = [], [], [], []
        for s in prefill:
            n = len(s)
            ids.extend(s.token_ids)
            pos.extend(range(n))
            slots.extend(self._slot(s, p) for p in range(n))
            seq_rows.extend([s.seq_id] * n)
        lens, tables, width = [], [], 0
        if decode:
            bs = self.block_size
            for s in decode:
                n = len(s)
                ids.append(s.token_ids[-1])
                pos.append(n - 1)
                slots.append(s.block_table[(n - 1) // bs] * bs + (n - 1) % bs)
                seq_rows.append(s.seq_id)
                lens.append(n)
            width = max(len(s.block_table) for s in decode)
            # Padding entries point at block 0; the context-length mask hides them.
            for s in decode:
                tables.extend(s.block_table)
                tables.extend([0] * (width - len(s.block_table)))
        T, B = len(ids), len(decode)
        buf = self._t(ids + pos + slots + lens + tables)
        meta = AttentionMetadata([len(s) for s in prefill], slot_mapping=buf[2 * T : 3 * T], block_size=self.block_size)
        if decode:
            meta.context_lens = buf[3 * T : 3 * T + B]
            meta.block_tables = buf[3 * T + B :].view(B, width)
        return buf[:T], buf[T : 2 * T], meta, seq_rows

    def _t(self, x) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def run(self, prefill: list[Sequence], decode: list[Sequence]) -> torch.Tensor:
        """Forward one step; returns logits [B, V] of each sequence's last position, in the order
        prefill + decode."""
        ids, pos, meta, seq_rows = self._prepare(prefill, decode)
        # The step context reaches each MoE layer's router event for this forward only.
        with self.model.hub.forward(self._batch_info(ids, pos, seq_rows)):
            hidden = self.model(ids, pos, meta, self.kv)
        if not prefill:  # every row is a decoding sequence's last token
            return self.model.compute_logits(hidden)
        P = meta.num_prefill_tokens
        last = torch.tensor(meta.prefill_lens, dtype=torch.int64, device=self.device).cumsum(0) - 1
        if decode:
            last = torch.cat([last, torch.arange(P, P + len(decode), device=self.device)])
        return self.model.compute_logits(hidden[last])

    def _batch_info(self, ids: torch.Tensor, pos: torch.Tensor, seq_rows: list[int]) -> BatchInfo | None:
        """This step's rows for the MoE layers' observers and forecaster; None (and no device-to-host
        copy) when nobody listens. Every step takes a number, so steps stay distinct either way."""
        step, self.step_count = self.step_count, self.step_count + 1
        if not self.model.hub.active:
            return None
        return BatchInfo(step, torch.tensor(seq_rows), pos.cpu(), ids.cpu())

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n, V] of every prompt position, without touching the KV cache."""
        ids = self._t(token_ids)
        meta = AttentionMetadata([len(token_ids)])
        with self.model.hub.forward(None):  # a scoring pass belongs to no engine step
            hidden = self.model(ids, torch.arange(len(token_ids), device=self.device), meta, None)
        return self.model.compute_logits(hidden)
