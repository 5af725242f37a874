"""`moe-rt serve --ep N`: one HTTP server over an expert-parallel group of N local ranks.

    parent (serve_ep_launch.serve_group: checks, reserves the port, supervises)
      ├─ rank 0      uvicorn + AsyncEngine over an EPEngineDriver   ─┐ EP group: the model's collectives
      └─ rank 1..N-1 follower_loop                                   ┘ control group: command batches

Invariant: every rank makes the same engine calls (add_request, abort, step) in the same order,
or the collectives inside every layer hang; given that, scheduler and sampler are deterministic
(same seeds), so every rank schedules the same batch and samples the same tokens. Rank 0 is the
only source of calls: its AsyncEngine drives an EPEngineDriver, which applies each add/abort
locally at once and records it; right before each step it broadcasts the recorded calls with the
step, and the followers replay them in order.

Protocol: one `Batch` per broadcast (pickled by broadcast_object_list):
    Batch(calls=(("add", request_id, prompt_ids, SamplingParams), ("abort", request_id), ...),
          action="step" | "stats" | "shutdown")
  calls   the adds that succeeded on rank 0 and the aborts rank 0 applied, since the last batch,
          in the order rank 0 applied them (an add rank 0 rejected is never sent).
  step    every rank calls engine.step(), then forgets the requests that finished in it.
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

from moe_rt.errors import MoeRtError

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
            engine.forget(call[1])
        else:
            raise MoeRtError(f"unknown EP engine call {call[0]!r}")


class EPEngineDriver:
    """Rank 0's engine as the AsyncEngine sees it: the LLMEngine calls it makes, plus the
    broadcasts that keep the followers in step. Used only from the AsyncEngine's engine thread.

    Mutating calls (add_request, abort, step, moe_stats, close) are mirrored to the followers;
    everything else below is a read or rank-local bookkeeping (release only forgets a finished
    request's record, which changes no scheduler state).
    """

    def __init__(self, ep_llm, control: ControlChannel, on_close: Callable[[], None] | None = None) -> None:
        self.ep_llm = ep_llm
        self.engine = ep_llm.llm.engine
        self._control = control
        self._calls: list[tuple] = []
        self._on_close = on_close
        self._broken = False  # a broadcast or step failed: the followers' state is unknown
        self._closed = False

    # -- mirrored calls -------------------------------------------------------------------------
    def add_request(self, prompt, params=None, request_id: str | None = None) -> str:
        ids = self.engine.encode_prompt(prompt)  # followers get ids: no tokenizing on every rank
        rid = self.engine.add_request(ids, params, request_id)  # a rejected add raises: never sent
        self._calls.append(("add", rid, ids, params))
        return rid

    def abort(self, request_id: str) -> bool:
        if request_id not in self.engine.requests:
            return False
        self._calls.append(("abort", request_id))
        return self.engine.abort(request_id)

    def forget(self, request_id: str) -> None:
        self.abort(request_id)  # mirrored; followers forget it when they replay the abort
        self.engine.requests.pop(request_id, None)

    def step(self):
        self._send("step")
        try:
            return self.engine.step()
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
        return {**self.engine.moe_stats(), "ep": group}

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
                if callable(getattr(self.engine, "close", None)):
                    self.engine.close()  # rank 0's own background work (expert cache)
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

    # -- reads and rank-local bookkeeping (same values on every rank) ---------------------------
    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def output(self, request_id: str):
        return self.engine.output(request_id)

    def release(self, request_id: str):
        return self.engine.release(request_id)

    def encode_prompt(self, prompt):
        return self.engine.encode_prompt(prompt)

    @property
    def requests(self) -> dict:
        return self.engine.requests

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def spec(self):
        return self.engine.spec

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def scheduler(self):
        return self.engine.scheduler

    @property
    def blocks(self):
        return self.engine.blocks

    @property
    def last_batch_size(self) -> int:
        return self.engine.last_batch_size

    @property
    def num_steps(self) -> int:
        return self.engine.num_steps


def follower_loop(control: ControlChannel, ep_llm) -> int:
    """Ranks 1..N-1: replay rank 0's batches until it says shutdown. Returns the steps taken."""
    engine = ep_llm.llm.engine
    steps = 0
    while True:
        batch = control.receive()
        apply_calls(engine, batch.calls)
        if batch.action == "step":
            # Same rule as rank 0's AsyncEngine: a request is forgotten once all its n sequences ended.
            ended = dict.fromkeys(o.request_id for o in engine.step() if o.finish_reason is not None)
            for rid in ended:
                if engine.output(rid).finished:
                    engine.release(rid)
            steps += 1
        elif batch.action == "stats":
            ep_llm.moe_stats(group_view=True)
        else:  # shutdown
            return steps
