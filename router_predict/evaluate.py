"""Replay a trace through predictors and score their forecasts against the recorded routing.

Metrics (pure functions below, tested with exact values) compare a score matrix with the true
top-k sets. Ranking ties break toward the lower expert id, so results never depend on sort order.
- recall@k: share of true experts inside the predicted top-k.
- precision@2k: share of the predicted top-2k (capped at E) that are true: a prefetch budget view.
- exact-set accuracy: predicted top-k set == true set.

Replay feeds each forward batch (rows sharing a step) layer by layer, as the engine would, and
times only the predict calls, so cost per token is what the predictor adds online.

Shape legend: M scored rows, N trace rows, T rows of a batch, L MoE layers, k experts per token,
E routed experts, D depth (look-ahead distances 1..D).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from router_predict.base import LayerObservation, Predictor
from router_predict.predictors.common import prev_tokens
from router_predict.registry import check_trace_fits
from router_predict.trace import Trace, iter_steps


def ranked_experts(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """scores [M, E] → [M, budget] expert ids, best first; ties go to the lower expert id."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[:, :budget]


def ranked_rows(scores: torch.Tensor, budget: int) -> list[list[int]]:
    """ranked_experts as lists of ids. A few rows (a decode step's forecast) are ranked in Python:
    a torch sort of one 16-wide row costs more than sorting it as a list. Python's sort is
    stable with reverse=True too, so ties still go to the lower expert id."""
    m, e = scores.shape
    if m * e <= 512:
        return [sorted(range(e), key=row.__getitem__, reverse=True)[:budget] for row in scores.float().tolist()]
    return ranked_experts(scores, budget).tolist()


def hit_counts(scores: torch.Tensor, true_ids: torch.Tensor, budget: int) -> torch.Tensor:
    """[M] how many of the row's true experts true_ids [M, k] are in its predicted top-`budget`."""
    picked = ranked_experts(scores, budget)
    return (picked[:, :, None] == true_ids.long()[:, None, :]).any(1).sum(-1)


def recall_at_k(scores: torch.Tensor, true_ids: torch.Tensor) -> float:
    k = true_ids.shape[-1]
    return hit_counts(scores, true_ids, k).sum().item() / (true_ids.shape[0] * k)


def precision_at_budget(scores: torch.Tensor, true_ids: torch.Tensor, budget: int) -> float:
    budget = min(budget, scores.shape[-1])
    return hit_counts(scores, true_ids, budget).sum().item() / (true_ids.shape[0] * budget)


def exact_set_accuracy(scores: torch.Tensor, true_ids: torch.Tensor) -> float:
    k = true_ids.shape[-1]
    return (hit_counts(scores, true_ids, k) == k).float().mean().item()


@dataclass
class Counts:
    """Running sums for one (distance, target layer) cell; merged into ratios at the end."""

    rows: int = 0
    hits_k: int = 0  # true experts inside top-k, summed over rows
    hits_2k: int = 0  # true experts inside top-2k (capped at E)
    exact: int = 0  # rows whose top-k set equals the true set

    def add(self, scores: torch.Tensor, true_ids: torch.Tensor) -> None:
        k, e = true_ids.shape[-1], scores.shape[-1]
        hk = hit_counts(scores, true_ids, k)
        self.rows += true_ids.shape[0]
        self.hits_k += int(hk.sum())
        self.hits_2k += int(hit_counts(scores, true_ids, min(2 * k, e)).sum())
        self.exact += int((hk == k).sum())

    def merged(self, other: "Counts") -> "Counts":
        return Counts(self.rows + other.rows, self.hits_k + other.hits_k,
                      self.hits_2k + other.hits_2k, self.exact + other.exact)

    def metrics(self, k: int, e: int) -> dict[str, float]:
        if self.rows == 0:
            return {"recall": math.nan, "precision_2k": math.nan, "exact": math.nan, "rows": 0}
        return {"recall": self.hits_k / (self.rows * k),
                "precision_2k": self.hits_2k / (self.rows * min(2 * k, e)),
                "exact": self.exact / self.rows, "rows": self.rows}


@dataclass
class PredictorReport:
    name: str
    depth: int
    by_distance: dict[int, dict[str, float]]  # d -> recall / precision_2k / exact / rows
    per_layer_recall: dict[int, list[float]]  # d -> [L] recall at each target layer (nan: unreachable)
    cost_us_per_token: float  # predict() time over all layers of a forward, per token
    path: dict[str, float] | None = None  # predict_path metrics over all L layers, if supported
    path_per_layer_recall: list[float] | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        clean = (lambda v: None if isinstance(v, float) and math.isnan(v) else v)
        return {"name": self.name, "depth": self.depth, "cost_us_per_token": self.cost_us_per_token,
                "by_distance": {str(d): {k: clean(v) for k, v in m.items()} for d, m in self.by_distance.items()},
                "per_layer_recall": {str(d): [clean(v) for v in r] for d, r in self.per_layer_recall.items()},
                "path": self.path, "path_per_layer_recall":
                    None if self.path_per_layer_recall is None else [clean(v) for v in self.path_per_layer_recall]}


def replay(trace: Trace, predictor: Predictor, depth: int, progress: bool = True) -> PredictorReport:
    """Score `predictor` on every batch and MoE layer of `trace` for distances 1..depth."""
    check_trace_fits(predictor, trace)
    num_layers, k, e = trace.num_layers, trace.top_k, trace.num_experts
    cells = {(d, t): Counts() for d in range(1, depth + 1) for t in range(num_layers)}
    path_cells = [Counts() for _ in range(num_layers)]
    has_path = True
    ids_all = torch.from_numpy(trace.topk_ids).long()  # [N, L, k]
    prev_all = None if trace.token_ids is None else prev_tokens(trace.seq_ids, trace.positions, trace.token_ids)
    spent_ns = 0
    for _, rows in tqdm(list(iter_steps(trace)), desc=f"replay {predictor.name}", disable=not progress):
        ids = ids_all[rows]
        hidden = None if trace.hidden is None else torch.from_numpy(trace.hidden[rows]).float()
        outputs = None if trace.layer_output is None else torch.from_numpy(trace.layer_output[rows]).float()
        token_ids = None if trace.token_ids is None else torch.from_numpy(trace.token_ids[rows])
        prev = None if prev_all is None else torch.from_numpy(prev_all[rows])
        positions = torch.from_numpy(trace.positions[rows])
        if has_path and token_ids is not None:
            path = predictor.predict_path(token_ids, positions, prev)  # [L, T, E] or None
            has_path = path is not None
            for t in range(num_layers if has_path else 0):
                path_cells[t].add(path[t], ids[:, t])
        for layer in range(num_layers - 1):
            obs = LayerObservation(layer, ids[:, layer], torch.from_numpy(trace.topk_weights[rows, layer]),
                                   None if hidden is None else hidden[:, layer], token_ids, positions, prev,
                                   None if outputs is None else outputs[:, layer])
            start = time.perf_counter_ns()
            scores = predictor.predict(obs, depth)  # [d, T, E]
            spent_ns += time.perf_counter_ns() - start
            d_max = predictor.lookahead(layer, depth)
            if tuple(scores.shape) != (d_max, ids.shape[0], e):
                raise RuntimeError(f"{predictor.name}.predict returned shape {tuple(scores.shape)}, "
                                   f"expected {(d_max, ids.shape[0], e)}")
            for d in range(1, d_max + 1):
                cells[(d, layer + d)].add(scores[d - 1], ids[:, layer + d])
    by_distance, per_layer = {}, {}
    for d in range(1, depth + 1):
        total = Counts()
        for t in range(num_layers):
            total = total.merged(cells[(d, t)])
        by_distance[d] = total.metrics(k, e)
        per_layer[d] = [cells[(d, t)].metrics(k, e)["recall"] for t in range(num_layers)]
    path_metrics = path_layers = None
    if has_path and trace.token_ids is not None:
        total = Counts()
        for c in path_cells:
            total = total.merged(c)
        path_metrics = total.metrics(k, e)
        path_layers = [c.metrics(k, e)["recall"] for c in path_cells]
    return PredictorReport(predictor.name, depth, by_distance, per_layer,
                           spent_ns / 1000 / trace.num_rows, path_metrics, path_layers)


def plot_recall_per_layer(reports: list[PredictorReport], path: str) -> None:
    """One panel per look-ahead distance: recall@k at each target MoE layer, one line per predictor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    depth = max(r.depth for r in reports)
    fig, axes = plt.subplots(1, depth, figsize=(5 * depth, 3.6), squeeze=False, sharey=True)
    for d in range(1, depth + 1):
        ax = axes[0, d - 1]
        for r in reports:
            if d in r.per_layer_recall:
                ys = np.array(r.per_layer_recall[d], dtype=float)
                ax.plot(np.arange(len(ys)), ys, marker="o", ms=3, label=r.name)
        ax.set_title(f"look-ahead d={d}")
        ax.set_xlabel("target MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("recall@k")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # below the panels, so it never hides a line
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
