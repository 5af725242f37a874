"""Run a routing predictor inside a live model: forecasts for the expert cache's prefetcher.

Right after MoE layer l routes a batch, OnlinePredictor.forecast(event) builds the LayerObservation
(router input, chosen experts, and from the step's BatchInfo the token ids, positions and previous
tokens), asks the Predictor for layers l+1..l+D, and turns each per-token forecast into one expert
score vector for the batch: how many of the batch's tokens have expert e in their predicted top-k.
That vector is what a prefetcher needs (which experts, how many tokens want each), so it is kept as
`latest(target)` and returned as a moe_rt Forecast.

It joins the model's RoutingHub in one of two roles (start(forecaster=...)):
- forecaster: each MoE block hands its forecasts to the model's expert store before preparing the
  layer (the order in moe_rt/layers/moe/events.py); expert_cache/install.py starts it so;
- observer: forecasts are made and scored but go nowhere (a predictor tracked for its recall).

Predictors that read a layer's output (needs_layer_output, e.g. gate_lookahead_output) forecast
later: the router event of layer l only scores what was forecast for l, and the forecast from l is
made when layer l's decoder layer finishes, from its output, caught by a forward hook (installed
only between start() and stop(); pass the model). Those forecasts are handed over at the next
router event, layer l+1's, which is still before prepare(l+1). The same scoring rules apply.

When layer l+d then routes, the per-token forecasts made for it are scored against what it chose
(recall@k, the same rule as offline replay in router_predict.evaluate), so `stats()` is the
predictor's live hit rate. A forecast is only ever scored against the same forward batch: forecasts
still pending when the next batch starts are dropped.

Cost: nothing is subscribed until start(), and the MoE blocks skip the hooks when no one listens.
When running, the whole forecast step (predict and bookkeeping) is timed per token.

Shape legend: T tokens of a batch, k experts per token, E routed experts, H router input size,
L MoE layers, D depth (look-ahead distances 1..D).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.events import Forecast, RouterEvent, RoutingHub
from router_predict.base import LayerObservation, Predictor
from router_predict.evaluate import ranked_rows
from router_predict.graded import GradedForecast, grade_counts, vote_grades
from router_predict.layer_output import hook_layer_outputs

_FRESH = ("fresh",)  # no forward seen yet: the next event starts one


@dataclass
class _Tally:
    rows: int = 0  # tokens whose forecast was scored
    hits: int = 0  # true experts inside the predicted top-k, summed over rows

    def recall(self, k: int) -> float | None:
        return self.hits / (self.rows * k) if self.rows else None


class OnlinePredictor:
    """Forecasts of later MoE layers' experts, made while the model runs, and their live recall."""

    def __init__(self, hub: RoutingHub, predictor: Predictor, depth: int = 1, *, device: str = "cpu",
                 max_tracked_seqs: int = 65536, model=None) -> None:
        """device: where observations are moved before predict() (where the predictor's weights live).

        max_tracked_seqs: sequences whose last token is remembered for prev_token_ids (oldest dropped).
        model: the loaded model behind `hub`; needed by predictors that read layer outputs.
        """
        if depth < 1:
            raise MoeRtError(f"online predictor depth must be >= 1, got {depth}")
        if getattr(predictor, "needs_layer_output", False) and model is None:
            raise MoeRtError(f"predictor {predictor.name} reads each MoE layer's output: give "
                             "OnlinePredictor the model (model=...)")
        max_depth = getattr(predictor, "max_depth", depth)
        if depth > max_depth:
            raise MoeRtError(f"predictor {predictor.name} was trained for depth {max_depth}, asked {depth}")
        self.hub, self.predictor, self.depth = hub, predictor, depth
        self.device = torch.device(device)
        self.max_tracked_seqs = max_tracked_seqs
        self.model = model
        self._detach: Callable[[], None] | None = None
        self._awaiting: dict[int, RouterEvent] = {}  # moe_index -> its event, until its output is known
        self._ready: list[Forecast] = []  # made since the last router event, handed out at the next
        self._latest: dict[int, torch.Tensor] = {}  # target moe_index -> [E] latest batch forecast
        self._last_token: OrderedDict[int, tuple[int, int]] = OrderedDict()  # seq id -> (position, token)
        self._forward: tuple | None = _FRESH  # identifies the batch being routed
        self._last_index = -1
        self._batch_cols: tuple | None = None  # (token_ids, positions, prev_token_ids) of this batch
        self._pending: dict[tuple[int, int], list[list[int]]] = {}  # (target, d) -> predicted top-k, T rows
        self._tally: dict[tuple[int, int], _Tally] = {}  # (target, d) -> running counts
        self._tokens = 0
        self._spent_ns = 0
        self.paused = False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, *, forecaster: bool = False) -> "OnlinePredictor":
        """Join the hub: as its forecaster (forecasts go to the model's expert store) or as an
        observer (forecasts only kept and scored)."""
        if self._detach is None:
            wants_output = getattr(self.predictor, "needs_layer_output", False)
            join = self.hub.set_forecaster(self) if forecaster else self.hub.subscribe(self._observe_only)
            try:
                unhook = hook_layer_outputs(self.model, self._on_layer_output) if wants_output else None
            except BaseException:
                join()
                raise

            def leave() -> None:
                if unhook is not None:
                    unhook()
                join()
            self._detach = leave
        return self

    def stop(self) -> None:
        """Leave the hub (and unhook); stats and latest forecasts stay readable."""
        if self._detach is not None:
            self._detach()
            self._detach = None
        self._drop_pending()

    def pause(self) -> None:
        """Stop predicting (a consumer found it does not pay) but stay joined: each router event
        then costs one attribute check. Pending forecasts are dropped, unscored."""
        self.paused = True
        self._drop_pending()

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._awaiting.clear()
        self._ready.clear()
        self._forward = _FRESH

    def resume(self) -> None:
        """Predict again from the next router event (which starts a new forward's bookkeeping)."""
        self.paused = False

    @property
    def spent_s(self) -> float:
        """Host seconds spent forecasting (predict and bookkeeping) so far."""
        return self._spent_ns * 1e-9

    def __enter__(self) -> "OnlinePredictor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- consumers ----------------------------------------------------------------------------
    def latest(self, moe_index: int) -> torch.Tensor | None:
        """The most recent forecast [E] for MoE layer `moe_index` (made from the nearest earlier layer)."""
        return self._latest.get(moe_index)

    def stats(self) -> dict:
        """Live recall@k of the forecasts (overall, per distance, per target layer) and cost per token."""
        k = self.predictor.top_k
        by_d, per_layer = {}, {}
        for d in range(1, self.depth + 1):
            total = _Tally()
            layers = {}
            for (target, dd), t in sorted(self._tally.items()):
                if dd == d:
                    total.rows, total.hits = total.rows + t.rows, total.hits + t.hits
                    layers[target] = {"recall": t.recall(k), "rows": t.rows}
            by_d[d] = {"recall": total.recall(k), "rows": total.rows}
            per_layer[d] = layers
        all_rows = sum(t.rows for t in self._tally.values())
        all_hits = sum(t.hits for t in self._tally.values())
        return {
            "predictor": self.predictor.name, "depth": self.depth, "top_k": k,
            "recall": all_hits / (all_rows * k) if all_rows else None,
            "by_distance": by_d, "per_layer": per_layer,
            "tokens": self._tokens,
            "cost_us_per_token": self._spent_ns / 1000 / self._tokens if self._tokens else None,
        }

    def reset_stats(self) -> None:
        self._tally.clear()
        self._tokens = self._spent_ns = 0

    # -- the forecaster -----------------------------------------------------------------------
    def forecast(self, event: RouterEvent) -> list[Forecast]:
        """Score what was forecast for this layer, forecast the next ones; returns every Forecast
        made since the previous router event (from this event, or from the previous layer's output)."""
        if self.paused:
            return []
        start = time.perf_counter_ns()
        self._observe(event)
        ready, self._ready = self._ready, []
        self._spent_ns += time.perf_counter_ns() - start
        return ready

    def _observe_only(self, event: RouterEvent) -> None:
        self.forecast(event)

    def _on_layer_output(self, moe_index: int, output: torch.Tensor) -> None:
        if self.paused:
            return
        start = time.perf_counter_ns()
        event = self._awaiting.pop(moe_index, None)
        if event is not None:
            if output.shape[0] != event.topk_ids.shape[0]:
                raise MoeRtError(f"output of MoE layer {moe_index} has {output.shape[0]} rows, its router "
                                 f"event {event.topk_ids.shape[0]}")
            self._forecast(event, output.detach().to(self.device, torch.float32))
        self._spent_ns += time.perf_counter_ns() - start

    def _observe(self, event: RouterEvent) -> None:
        l, num_layers = event.moe_index, self.predictor.num_layers
        if not 0 <= l < num_layers:
            raise MoeRtError(f"router event for MoE layer {l}, predictor is for {num_layers} layers")
        batch = event.batch
        if batch is not None and batch.token_ids.shape[0] != event.topk_ids.shape[0]:
            batch = None  # the layer routed a slice of the step's rows (an expert-parallel rank's share)
        # A new forward starts at a new engine step, or (outside the engine) when layer indices restart.
        forward = (batch.step,) if batch is not None else None
        if forward != self._forward or l <= self._last_index:
            self._new_forward(event, batch, forward)
        self._last_index = l
        true_ids = None
        for d in range(1, self.depth + 1):
            picked = self._pending.pop((l, d), None)
            if picked is not None:
                if true_ids is None:
                    true_ids = event.topk_ids.tolist()  # [T][k]
                tally = self._tally.setdefault((l, d), _Tally())
                tally.rows += len(true_ids)
                # hit_counts' rule: the true experts inside the predicted top-k, on the stored top-k.
                tally.hits += sum(x in p for p, true in zip(picked, true_ids) for x in true)
        if self.predictor.lookahead(l, self.depth) == 0:
            return
        if getattr(self.predictor, "needs_layer_output", False):
            self._awaiting[l] = event  # forecast from l once its decoder layer's output exists
            return
        self._forecast(event, None)

    def _forecast(self, event: RouterEvent, layer_output: torch.Tensor | None) -> None:
        """Predict layers l+1..l+D from layer l's event (and output); keep the forecasts for scoring
        and `latest`, and queue them for the next forecast() to hand out."""
        l = event.moe_index
        token_ids, positions, prev = self._batch_cols or (None, None, None)
        dev = self.device
        obs = LayerObservation(
            l, event.topk_ids.detach().to(dev, torch.long), event.topk_weights.detach().to(dev, torch.float32),
            event.hidden.detach().to(dev, torch.float32) if self.predictor.needs_hidden else None,
            token_ids, positions, prev, layer_output)
        with torch.no_grad():
            scores = self.predictor.predict(obs, self.depth).float().cpu()  # [d, T, E]
        d_max, t, e = scores.shape
        # One ranking for all distances; ties go to the lower expert id, as in offline replay.
        flat = scores.reshape(d_max * t, e)
        k = self.predictor.top_k
        ranked = ranked_rows(flat, 2 * k)  # d_max*T rows: k votes, then k runner-ups
        picked = [row[:k] for row in ranked]
        grades = vote_grades(flat, ranked, k)  # how confident each pick is (router_predict/graded.py)
        for d in range(1, d_max + 1):
            target = l + d
            rows = picked[(d - 1) * t: d * t]
            votes = [0.0] * e
            for row in rows:
                for x in row:
                    votes[x] += 1.0
            self._pending[(target, d)] = rows
            self._latest[target] = agg = torch.tensor(votes)  # [E]
            self._ready.append(GradedForecast(target, agg, d, grade_counts(ranked[(d - 1) * t: d * t], grades[(d - 1) * t: d * t])))

    def _new_forward(self, event: RouterEvent, batch, forward: tuple | None) -> None:
        self._forward = forward
        self._pending.clear()
        self._awaiting.clear()
        self._ready.clear()  # made in a forward that never reached its next layer (it raised)
        self._tokens += event.topk_ids.shape[0]
        if batch is None:
            self._batch_cols = None
            return
        token_ids = batch.token_ids.to("cpu", torch.long)
        positions = batch.positions.to("cpu", torch.long)
        self._batch_cols = (token_ids.to(self.device), positions.to(self.device),
                            self._prev_tokens(batch.seq_ids.tolist(), positions.tolist(),
                                              token_ids.tolist()).to(self.device))

    def _prev_tokens(self, seq_ids: list[int], positions: list[int], token_ids: list[int]) -> torch.Tensor:
        """[T] token at position-1 of each row's sequence, -1 if unknown (as in docs/traces.md).

        Rows of a sequence arrive in increasing position order (prefill rows are contiguous, decode
        adds one), so the last token seen per sequence is enough.
        """
        out = []
        last = self._last_token
        for s, p, t in zip(seq_ids, positions, token_ids):
            seen = last.get(s)
            out.append(seen[1] if seen is not None and seen[0] == p - 1 else -1)
            last[s] = (p, t)
            last.move_to_end(s)
        while len(last) > self.max_tracked_seqs:
            last.popitem(last=False)
        return torch.tensor(out, dtype=torch.long)
