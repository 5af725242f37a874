"""A decode batch's rows as host integers, and the padded form a captured decode step reads.

Shape legend: B decoding sequences, W block-table width in blocks (the longest table of the batch,
or the captured width a graph was recorded for).

Every integer a decode step needs goes to the device as one int64 tensor whose parts are views:

    [ids (B) | positions (B) | slots (B) | context lens (B) | block tables (B * W)]

ModelRunner._prepare puts a prefill part's ids, positions and slots ahead of the decode rows' in
each of the first three parts; a captured step (cuda_graphs.py) has no prefill part and reads the
layout exactly as drawn, from a buffer that outlives every step. Pure: nothing here touches a device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_rt.errors import MoeRtError

from .sequence import Sequence


@dataclass
class DecodeRows:
    """One new token per decoding sequence: what it reads and where its key and value go."""

    ids: list[int]  # [B] the sequence's last token
    pos: list[int]  # [B] its position
    slots: list[int]  # [B] KV cache slot its key and value are written to
    lens: list[int]  # [B] context length including the new token
    tables: list[list[int]]  # B block tables, each as long as its sequence needs

    @classmethod
    def of(cls, decode: list[Sequence], block_size: int) -> "DecodeRows":
        rows = cls([], [], [], [], [])
        for s in decode:
            n = len(s)
            rows.ids.append(s.token_ids[-1])
            rows.pos.append(n - 1)
            rows.slots.append(s.block_table[(n - 1) // block_size] * block_size + (n - 1) % block_size)
            rows.lens.append(n)
            rows.tables.append(s.block_table)
        return rows

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def width(self) -> int:
        """Blocks in the longest table (0 for no rows)."""
        return max((len(t) for t in self.tables), default=0)

    def flat_tables(self, batch: int, width: int) -> list[int]:
        """The tables as a [batch, width] grid, row by row. Padding entries point at block 0; the
        context-length mask hides them, so what block 0 holds is never attended to."""
        out: list[int] = []
        for t in self.tables:
            out.extend(t)
            out.extend([0] * (width - len(t)))
        out.extend([0] * ((batch - len(self.tables)) * width))
        return out

    def padded(self, batch: int, width: int, scratch_slot: int) -> list[int]:
        """The whole layout for `batch` rows and `width` blocks: these rows, then padding rows that
        read token 0 at position 0 over one key (block 0, context length 1, so no row is all
        masked) and write their key and value to `scratch_slot`, a slot no sequence is given.
        A padding row's output is discarded; it must only never write where a sequence reads."""
        n = len(self)
        if n > batch or self.width > width:
            raise ValueError(f"{n} rows of {self.width} blocks do not fit a [{batch}, {width}] step")
        pad = batch - n
        return (self.ids + [0] * pad + self.pos + [0] * pad + self.slots + [scratch_slot] * pad
                + self.lens + [1] * pad + self.flat_tables(batch, width))


def decode_views(flat: torch.Tensor, batch: int, width: int) -> tuple[torch.Tensor, ...]:
    """(ids [B], positions [B], slots [B], context lens [B], block tables [B, W]) viewed in `flat`."""
    B = batch
    tables = flat[4 * B : 4 * B + B * width].view(B, width)
    return flat[:B], flat[B : 2 * B], flat[2 * B : 3 * B], flat[3 * B : 4 * B], tables


def doubling_sizes(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `limit`, then `limit`: the batch sizes (and block-table widths) a decode
    step is captured for. A batch pads to the next one, so at most half its rows are padding."""
    sizes, n = [], 1
    while n < limit:
        sizes.append(n)
        n *= 2
    return tuple(sizes + [limit])


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest of `sizes` (ascending) that holds `n`."""
    for s in sizes:
        if s >= n:
            return s
    raise MoeRtError(f"{n} exceeds the largest captured size {sizes[-1]}")
