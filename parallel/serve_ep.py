"""`moe-rt serve --ep N`: one HTTP server over an expert-parallel group of N local ranks.

    parent (serve_ep_launch.serve_group: checks, reserves the port, supervises)
      ├─ rank 0      uvicorn + AsyncEngine over an EPEngineDriver   ─┐ EP group: the model's collectives
      └─ rank 1..N-1 follower_loop                                   ┘ control group: command batches

Invariant: every rank makes the same engine calls (add_request, abort, step) in the same order,
or the collectives inside every layer hang; given that, scheduler and sampler are deterministic
(same seeds), so every rank schedules the same batch and samples the same tokens, and the
engine's own finished-request rule (a request leaves in the step its last sequence ends) drops
the same requests on every rank. Rank 0 is the only source of calls: its AsyncEngine drives an
EPEngineDriver (an EngineCore, moe_rt/engine/core.py), which applies each add/abort locally at
once and records it; right before each step it broadcasts the recorded calls with the step, and
the followers replay them in order.

Protocol: one `Batch` per broadcast (pickled by broadcast_object_list):
    Batch(calls=(("add", request_id, prompt_ids, SamplingParams), ("abort", request_id), ...),
          action="step" | "stats" | "shutdown")
  calls   the adds that succeeded on rank 0 and the aborts rank 0 applied, since the last batch,
          in the order rank 0 applied them (an add rank 0 rejected is never sent).
  step    every rank calls engine.step() (which lets go of the requests that finished in it).
  stats   every rank joins the all-gather of its EP counters (EPLLM.moe_stats(group_view=True)).
  shutdown  followers return; rank 0 sends it once, when its engine thread ends cleanly.
Rank 0 broadcasts only when it is about to step, read group stats or stop: an idle server sends
nothing, and followers block in the receive without spinning.

Starting, supervising and stopping the rank processes: moe_rt_app/cli/serve_ep.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from moe_rt.engine.core import CoreStats
from moe_rt.engine.llm_engine import LLMEngine
from moe_rt.errors import MoeRtError
from moe_rt.outputs import StepResult
from moe_rt.sampling_params import SamplingParams
from moe_rt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ACTIONS = ("step", "stats", "shutdown")
# The control group waits as long as the server idles. A dead rank is found by the parent, which
# watches every rank's process and ends the group, not by this timeout.
CONTROL_TIMEOUT = timedelta(days=3650)
FOLLOWER_EXIT_S = 15.0  # after rank 0 ended: how long followers may take to leave before a kill


@dataclass(frozen=True)
class Batch:
    """The engine calls rank 0 made since the last broadcast, then what every rank does next."""

    calls: tuple[tuple, ...]  # ("add", rid, ids, params) | ("abort", rid), in rank 0's order
    action: str  # one of ACTIONS

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise MoeRtError(f"unknown EP control action {self.action!r}")


class ControlChannel:
    """Broadcasts Batches from rank 0 to every rank over a gloo group of its own.

    Why not the EP group: (1) followers wait here for as long as the server idles, which must not
    trip the timeout that guards the model's collectives; (2) on CUDA the EP group is nccl, where
    an object broadcast needs device tensors and stream syncs; a small CPU message fits gloo;
    (3) control messages never share a communicator with the model's collectives, so their
    ordering cannot mix. Rank 0 issues all its collectives (control and model) from its one
    engine thread, so they never run concurrently.
    """

    def __init__(self, group, world: int) -> None:
        self.group, self.world = group, world

    @classmethod
    def create(cls, world: int) -> ControlChannel:
        """A collective: every rank calls it, in the same order relative to other group creations."""
        return cls(dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT), world)

    def send(self, batch: Batch) -> None:
        dist.broadcast_object_list([batch], src=0, group=self.group)

    def receive(self) -> Batch:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def apply_calls(engine, calls: tuple[tuple, ...]) -> None:
    """Replay rank 0's calls on a follower's engine (rank 0 already applied them to its own)."""
    for call in calls:
        if call[0] == "add":
            _, rid, ids, params = call
            engine.add_request(ids, params, rid)  # an error here means the ranks diverged: fail loudly
        elif call[0] == "abort":
            engine.abort(call[1])
        else:
            raise MoeRtError(f"unknown EP engine call {call[0]!r}")


class EPEngineDriver:
    """Rank 0's engine as the AsyncEngine sees it: an EngineCore over rank 0's LLMEngine whose
    state-changing calls (add_request, abort, step, moe_stats, close) are mirrored to the
    followers. Used only from the AsyncEngine's engine thread. The reads (stats, has_unfinished,
    the tokenizer facts) are rank 0's: every rank holds the same values.
    """

    def __init__(self, ep_llm, control: ControlChannel, on_close: Callable[[], None] | None = None) -> None:
        self.ep_llm = ep_llm
        self._engine: LLMEngine = ep_llm.llm.engine
        self._control = control
        self._calls: list[tuple] = []
        self._on_close = on_close
        self._broken = False  # a broadcast or step failed: the followers' state is unknown
        self._closed = False

    # -- mirrored calls -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        ids = self._engine.encode_prompt(prompt)  # followers get ids: no tokenizing on every rank
        rid = self._engine.add_request(ids, params, request_id)  # a rejected add raises: never sent
        self._calls.append(("add", rid, ids, params))
        return rid

    def abort(self, request_id: str) -> bool:
        if not self._engine.abort(request_id):
            return False  # not held on rank 0, so on no rank: nothing to replay
        self._calls.append(("abort", request_id))
        return True

    def step(self) -> StepResult:
        self._send("step")
        try:
            return self._engine.step()
        except BaseException:
            self._broken = True  # e.g. a follower died mid-collective
            raise

    def moe_stats(self) -> dict:
        """Every registered source of rank 0, plus "ep": the merged counters of all ranks."""
        self._send("stats")
        try:
            group = self.ep_llm.moe_stats(group_view=True)
        except BaseException:
            self._broken = True
            raise
        return {**self._engine.moe_stats(), "ep": group}

    def close(self) -> None:
        """Tell the followers to stop (unless the group is already broken), then release rank 0."""
        if self._closed:
            return
        try:
            if not self._broken:
                self._send("shutdown")
        finally:
            self._closed = True
            try:
                self._engine.close()  # rank 0's own background work (expert cache)
            finally:
                if self._on_close is not None:
                    self._on_close()

    def _send(self, action: str) -> None:
        if self._closed:
            raise MoeRtError("the EP group has shut down")
        batch, self._calls = Batch(tuple(self._calls), action), []
        try:
            self._control.send(batch)
        except BaseException:
            self._broken = True
            raise

    # -- reads (same values on every rank) ------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished()

    def stats(self) -> CoreStats:
        return self._engine.stats()

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self._engine.encode_prompt(prompt)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._engine.vocab_size


def follower_loop(control: ControlChannel, ep_llm) -> int:
    """Ranks 1..N-1: replay rank 0's batches until it says shutdown. Returns the steps taken."""
    engine = ep_llm.llm.engine
    steps = 0
    while True:
        batch = control.receive()
        apply_calls(engine, batch.calls)
        if batch.action == "step":
            engine.step()  # finished requests leave the engine in it, as on rank 0; nobody reads them here
            steps += 1
        elif batch.action == "stats":
            ep_llm.moe_stats(group_view=True)
        else:  # shutdown
            return steps
