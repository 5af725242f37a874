"""Continuous batching: admit waiting sequences between steps, decode the running ones together,
and preempt (free the KV, recompute later) when the cache is full. Never crashes on a full cache:
the newest running sequence yields its blocks to the older ones."""
from __future__ import annotations

from collections import deque

from moe_rt.config import EngineConfig

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.max_num_seqs = cfg.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Sequences for the next step and whether it is a prefill step."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += len(seq)
        if batch:
            self.running.extend(batch)
            return batch, True
        for seq in list(self.running):
            if seq.status != Status.RUNNING:
                continue  # preempted below while serving an older sequence
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                batch.append(seq)
        return batch, False

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.deallocate(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.deallocate(seq)
