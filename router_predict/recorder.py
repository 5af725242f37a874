"""Record a routing trace online by listening to a model's RoutingHub.

Each MoE layer emits one RouterEvent per forward batch; the recorder gathers the L events of a step
and appends its T rows in batch order, so trace rows keep execution order and rows sharing a step
are exactly one forward batch (the replay invariant of docs/traces.md). With a model and
with_layer_output, forward hooks on its MoE layers' decoder layers (installed only between start()
and stop()) also record each MoE layer's output, the residual stream after its experts.

Shape legend: T rows of a batch, L MoE layers, k experts per token, H router input size.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.events import RouterEvent, RoutingHub
from router_predict.layer_output import attach_observer
from router_predict.trace import Trace, TraceMeta, validate_trace


class TraceRecorder:
    def __init__(self, hub: RoutingHub, num_layers: int, with_hidden: bool = False, *,
                 model=None, with_layer_output: bool = False) -> None:
        """model: the loaded model behind `hub`; needed (only) for with_layer_output."""
        if with_layer_output and model is None:
            raise MoeRtError("recording layer outputs needs the model (TraceRecorder(..., model=...))")
        self.hub = hub
        self.num_layers = num_layers
        self.with_hidden = with_hidden
        self.model, self.with_layer_output = model, with_layer_output
        self._detach: Callable[[], None] | None = None
        self._outputs: dict[int, torch.Tensor] = {}  # moe_index -> [T, H] float16 output of the current step
        self._step: int | None = None
        self._pending: dict[int, RouterEvent] = {}  # moe_index -> event of the current step
        self._chunks: list[dict[str, np.ndarray]] = []  # one per finished step
        self.layer_ids: list[int | None] = [None] * num_layers

    def start(self) -> None:
        if self._detach is None:
            self._detach = attach_observer(self.hub, self._on_event, self.model,
                                           self._on_layer_output if self.with_layer_output else None)

    def stop(self) -> None:
        """Unsubscribe and close the step in progress (its rows become part of the trace)."""
        if self._detach is not None:
            self._detach()
            self._detach = None
        self._flush()

    def _on_event(self, event: RouterEvent) -> None:
        batch = event.batch
        if batch is None:
            raise MoeRtError("TraceRecorder needs BatchInfo on router events (run the model through the engine)")
        if not 0 <= event.moe_index < self.num_layers:
            raise MoeRtError(f"router event for MoE layer {event.moe_index}, recorder expects {self.num_layers}")
        if self._step is not None and batch.step != self._step:
            self._flush()
        if event.moe_index in self._pending:
            raise MoeRtError(f"step {batch.step} routed MoE layer {event.moe_index} twice")
        self._step = batch.step
        self._pending[event.moe_index] = event
        self.layer_ids[event.moe_index] = event.layer_id

    def _on_layer_output(self, moe_index: int, output: torch.Tensor) -> None:
        event = self._pending.get(moe_index)
        if event is None:  # the hook fires after the layer's router event of the same forward
            raise MoeRtError(f"output of MoE layer {moe_index} arrived without its router event")
        if output.shape[0] != event.topk_ids.shape[0]:
            raise MoeRtError(f"output of MoE layer {moe_index} has {output.shape[0]} rows, its router "
                             f"event {event.topk_ids.shape[0]}")
        self._outputs[moe_index] = output.detach().to(torch.float16).cpu()

    def _flush(self) -> None:
        if not self._pending:
            return
        missing = [l for l in range(self.num_layers) if l not in self._pending]
        if missing:
            raise MoeRtError(f"step {self._step} has no router event for MoE layer(s) {missing}")
        events = [self._pending[l] for l in range(self.num_layers)]
        batch = events[0].batch
        chunk = {
            "topk_ids": torch.stack([e.topk_ids for e in events], 1).to(torch.int32).cpu().numpy(),
            "topk_weights": torch.stack([e.topk_weights for e in events], 1).float().cpu().numpy(),
            "seq_ids": batch.seq_ids.long().cpu().numpy(),
            "positions": batch.positions.long().cpu().numpy(),
            "steps": np.full(batch.seq_ids.shape[0], batch.step, dtype=np.int64),
            "token_ids": batch.token_ids.long().cpu().numpy(),
        }
        if self.with_hidden:
            chunk["hidden"] = torch.stack([e.hidden for e in events], 1).to(torch.float16).cpu().numpy()
        if self.with_layer_output:
            missing = [l for l in range(self.num_layers) if l not in self._outputs]
            if missing:
                raise MoeRtError(f"step {self._step} has no layer output for MoE layer(s) {missing}")
            chunk["layer_output"] = torch.stack([self._outputs[l] for l in range(self.num_layers)], 1).numpy()
        self._chunks.append(chunk)
        self._pending, self._outputs, self._step = {}, {}, None

    def to_trace(self, meta: TraceMeta) -> Trace:
        """All steps recorded so far as a validated Trace (meta.layer_ids must match the events)."""
        self._flush()
        if not self._chunks:
            raise MoeRtError("the recorder saw no router events")
        if list(meta.layer_ids) != self.layer_ids:
            raise MoeRtError(f"meta layer_ids {list(meta.layer_ids)} differ from the recorded {self.layer_ids}")
        cat = {k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0]}
        trace = Trace(cat["topk_ids"], cat["topk_weights"], cat["seq_ids"], cat["positions"], cat["steps"],
                      meta, cat.get("hidden"), cat["token_ids"], cat.get("layer_output"))
        validate_trace(trace, "recorded trace")
        return trace
