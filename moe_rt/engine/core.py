"""EngineCore: the small surface a driver (the LLM API, the server's engine thread, the EP driver)
uses to run an engine, and CoreStats, the engine's own figures as one immutable snapshot.

A driver never reads engine internals (scheduler, block manager, Sequence objects): what it needs
comes out of step() (deltas with their logprobs, and the final outputs of requests that ended) or
stats(). LLMEngine implements it; so does parallel's EPEngineDriver, which mirrors every call that
changes engine state to the follower ranks.

The finished-request rule, written once in LLMEngine.step(): a request leaves the engine in the
step where its last sequence finishes (normally or with finish_reason "error"), and that step's
StepResult.finished carries its final RequestOutput. abort() is the only other way out: it ends
the request and forgets it at once. So every request an engine holds is unfinished, and a driver
never releases anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from moe_rt.outputs import StepResult
from moe_rt.sampling_params import SamplingParams
from moe_rt.tokenizer import Tokenizer


@dataclass(frozen=True)
class CoreStats:
    """The engine's state after its latest step (or add/abort), read in one call."""

    running_seqs: int = 0  # sequences in the running batch
    waiting_seqs: int = 0  # sequences admitted to the engine but waiting for KV / a batch slot
    active_requests: frozenset[str] = frozenset()  # request ids the engine still holds (all unfinished)
    last_batch_size: int = 0  # sequences in the latest step's batch
    num_steps: int = 0  # steps that ran a batch
    num_preemptions: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0  # equals kv_blocks_total when no request holds KV

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use (0 before the engine reports any)."""
        return 1 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0


@runtime_checkable
class EngineCore(Protocol):
    """What a driver calls. Not thread-safe: one thread makes every call (the read-only facts
    tokenizer, max_model_len, vocab_size and encode_prompt excepted)."""

    tokenizer: Tokenizer  # read-only after load
    max_model_len: int  # prompt + output tokens one request may hold
    vocab_size: int  # token ids are in [0, vocab_size)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Text or token ids -> validated token ids (MoeRtError on an empty or out-of-range prompt)."""
        ...

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (all its n sequences or none); returns its id. MoeRtError on bad input."""
        ...

    def abort(self, request_id: str) -> bool:
        """End the request, free its KV blocks and forget it. False if the engine does not hold it
        (unknown, or already finished and returned by step)."""
        ...

    def has_unfinished(self) -> bool:
        ...

    def step(self) -> StepResult:
        """Run one batch: every touched sequence's delta, and the requests that ended in it."""
        ...

    def stats(self) -> CoreStats:
        ...

    def moe_stats(self) -> dict:
        """MoE figures of the parts installed on the engine (cache, predictor, expert parallelism)."""
        ...

    def close(self) -> None:
        """Stop the engine's background parts; idempotent."""
        ...
