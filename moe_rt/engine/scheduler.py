"""Continuous batching: every step decodes the running sequences and, in the same forward,
prefills waiting ones admitted between steps; when the cache is full the newest running sequence
is preempted (its KV freed, recomputed later) so older ones go on. Never crashes on a full cache.
Which running sequences decode in a step is the decode policy's choice (decode_policy.py): all of
them (fcfs), or a subset under expert_aware; the others keep their KV and wait."""
from __future__ import annotations

from collections import deque

from moe_rt.config import EngineConfig

from .block_manager import BlockManager
from .decode_policy import FCFS, DecodePolicy
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, policy: DecodePolicy | None = None) -> None:
        self.max_num_seqs = cfg.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.blocks = blocks
        self.policy = policy or FCFS()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """(prefill, decode) for the next step; both run in one forward.

        Running sequences come first: each the decode policy selects gets the slot for its next
        token, preempting the newest running sequence when the cache is full (the others wait
        with their KV). Waiting sequences are then admitted while the running set, the token
        budget (decode tokens count 1 each) and the free blocks allow; the first admission ignores
        the token budget when nothing else would run, so a prompt longer than the budget still
        gets its turn.
        """
        decode: list[Sequence] = []
        selected = set(self.policy.select(list(self.running)))
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq not in selected:
                continue  # preempted below while serving an older sequence, or waits this step
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                decode.append(seq)
        prefill: list[Sequence] = []
        tokens = len(decode)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if tokens + len(seq) > self.max_num_batched_tokens and (prefill or decode):
                break
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            prefill.append(seq)
            tokens += len(seq)
        return prefill, decode

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.deallocate(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.policy.forget(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.deallocate(seq)
