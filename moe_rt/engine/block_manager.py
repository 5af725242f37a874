"""Owns the KV-cache blocks. Every check is paired with its action (can_allocate/allocate,
can_append/append); the scheduler never touches block lists itself.

Invariant: a RUNNING sequence of length n owns exactly ceil(n / block_size) blocks once the step
that writes token n-1's KV is scheduled.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table
        seq.block_table = [self.free.popleft() for _ in range(self.blocks_for(len(seq)))]

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= self.blocks_for(len(seq)) or len(self.free) >= 1

    def append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(len(seq)):
            seq.block_table.append(self.free.popleft())

    def deallocate(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
