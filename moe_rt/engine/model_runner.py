"""Turns scheduled sequences into one flattened forward batch over the paged KV cache.

Shape legend: T tokens in the step, B sequences, V vocabulary, KV key/value heads, hd head dim.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from moe_rt.layers.attention import AttentionMetadata, LayerKV
from moe_rt.layers.moe.events import BatchInfo
from moe_rt.models.model import MoEForCausalLM

from .cuda_graphs import DecodeGraphs, GraphShapes, graph_blocker
from .decode_rows import DecodeRows
from .sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device,
                 graphs: GraphShapes | None = None) -> None:
        """graphs: the shapes decode-only steps replay from captured CUDA graphs (cuda_graphs.py;
        uncaptured on a CPU); None runs every step eager."""
        self.model = model
        self.block_size = block_size
        self.device = device
        self._on_cpu = torch.device(device).type == "cpu"
        slots = num_blocks * block_size
        # With graphs, one slot past the last block: the padding rows of a captured step write there.
        extra = 1 if graphs is not None else 0
        self.kv = [LayerKV.allocate(model.spec.attention, slots + extra, dtype, device)
                   for _ in range(model.spec.num_layers)]
        self.step_count = 0
        self.graphs = None if graphs is None else DecodeGraphs(self._logits, graphs, block_size, slots,
                                                               torch.device(device))
        self._blocked: str | None = None  # the last reason a decode step could not replay, logged once

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _prepare(self, prefill: list[Sequence], decode: list[Sequence]):
        """Rows: every prefilled sequence's whole token list, then each decoding sequence's last token.
        Every integer the step needs (ids, positions, slots, context lengths, block tables) goes to
        the device as one tensor; the parts are views of it (the layout in decode_rows.py)."""
        ids, pos, slots, seq_rows = [], [], [], []
        for s in prefill:
            n = len(s)
            ids.extend(s.token_ids)
            pos.extend(range(n))
            slots.extend(self._slot(s, p) for p in range(n))
            seq_rows.extend([s.seq_id] * n)
        rows = DecodeRows.of(decode, self.block_size)
        ids += rows.ids
        pos += rows.pos
        slots += rows.slots
        seq_rows.extend(s.seq_id for s in decode)
        T, B, width = len(ids), len(decode), rows.width
        buf = self._t(ids + pos + slots + rows.lens + rows.flat_tables(B, width))

        def part(start: int, *shape: int) -> torch.Tensor:
            """buf's rows from `start` as a contiguous [n] or [n, m] view: one as_strided op where a
            slice takes two (and a slice plus a view three)."""
            return buf.as_strided(shape, (1,) if len(shape) == 1 else (shape[1], 1), start)

        meta = AttentionMetadata([len(s) for s in prefill], slot_mapping=part(2 * T, T), block_size=self.block_size)
        if decode:
            meta.context_lens = part(3 * T, B)
            meta.block_tables = part(3 * T + B, B, width)
        return part(0, T), part(T, T), meta, seq_rows

    def _t(self, x) -> torch.Tensor:
        # through numpy: one dispatched op where torch.tensor(list) takes four
        t = torch.from_numpy(np.array(x, dtype=np.int64))
        return t if self._on_cpu else t.to(self.device)

    @torch.inference_mode()
    def run(self, prefill: list[Sequence], decode: list[Sequence]) -> torch.Tensor:
        """Forward one step; returns logits [B, V] of each sequence's last position, in the order
        prefill + decode."""
        if not prefill and self._replayable(decode):
            self.step_count += 1  # a replayed step takes its number too, as _batch_info does
            return self.graphs.run(DecodeRows.of(decode, self.block_size))
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

    def _logits(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A decode-only step's logits [B, V]: the region the graphs capture."""
        return self.model.compute_logits(self.model(ids, pos, meta, self.kv))

    def _replayable(self, decode: list[Sequence]) -> bool:
        """Whether this decode-only step replays a graph: graphs on, and nothing reading the
        step's routing on the host (an observer attached after start-up sends it down the eager
        path, with one log line each time the reason changes)."""
        if self.graphs is None or not decode:
            return False
        why = graph_blocker(self.model.moe_ctx)
        if why != self._blocked and why is not None:
            log.info("cuda_graphs: decode steps run eager while %s", why)
        self._blocked = why
        return why is None

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
