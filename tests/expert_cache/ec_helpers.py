"""Tiny traces for the expert_cache tests, written with numpy in the documented .npz format."""
from __future__ import annotations

import json

import numpy as np

from router_predict.trace import Trace, TraceMeta


def trace_from_steps(steps: list[list[list[list[int]]]], num_experts: int) -> Trace:
    """steps[s][t][l] = the top-k experts of token t of step s at MoE layer l."""
    rows, step_ids = [], []
    for s, tokens in enumerate(steps):
        for tok in tokens:
            rows.append(tok)
            step_ids.append(s)
    ids = np.asarray(rows, dtype=np.int32)  # [N, L, k]
    n, num_layers, k = ids.shape
    return Trace(topk_ids=ids, topk_weights=np.full(ids.shape, 1.0 / k, np.float32),
                 seq_ids=np.zeros(n, np.int64), positions=np.arange(n, dtype=np.int64),
                 steps=np.asarray(step_ids, np.int64),
                 meta=TraceMeta(num_experts, k, tuple(range(num_layers)), "synthetic"))


def single_layer(seq: list[int], num_experts: int) -> Trace:
    """One MoE layer, one token per step choosing one expert: a plain request sequence."""
    return trace_from_steps([[[[e]]] for e in seq], num_experts)


def random_trace(seed: int, n: int = 24, num_layers: int = 3, num_experts: int = 6, k: int = 2,
                 tokens_per_step: int = 2) -> Trace:
    """Skewed expert popularity (as real routers have), a few tokens per batch."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(num_experts, 0.5))
    ids = [[rng.choice(num_experts, k, replace=False, p=p).tolist() for _ in range(num_layers)]
           for _ in range(n)]
    steps = [ids[i:i + tokens_per_step] for i in range(0, n, tokens_per_step)]
    return trace_from_steps(steps, num_experts)


def write_npz(path, trace: Trace) -> None:
    """Write the .npz directly with numpy (as an outside tool would), not through save_trace."""
    meta = {"num_experts": trace.num_experts, "top_k": trace.top_k,
            "layer_ids": list(trace.meta.layer_ids), "model": trace.meta.model}
    np.savez(path, topk_ids=trace.topk_ids, topk_weights=trace.topk_weights,
             seq_ids=trace.seq_ids, positions=trace.positions, steps=trace.steps,
             meta=np.array(json.dumps(meta)))


def noisy_schedule(trace, depth, seed, graded=False):
    """The oracle's forecasts plus wrong ones, so the measured precision falls below 1 and the
    cost rule turns some prefetches down. `graded`: right votes graded 6, wrong ones 1, plus a
    runner-up (no vote) per layer, as router_predict.graded grades a predictor's forecasts."""
    import random

    from expert_cache.policies import Prediction
    from expert_cache.simulator import ForecastSchedule
    from router_predict.graded import NUM_GRADES

    def grade(g, n=1):
        out = [0] * NUM_GRADES
        out[g] = n
        return tuple(out)

    from expert_cache.simulator import oracle_schedule

    E = trace.num_experts
    rng = random.Random(seed)
    exact = oracle_schedule(trace, depth)
    rounds = []
    for step in exact.forecasts:
        per_layer = []
        for f in step:
            f = {k: Prediction(p.distance, p.score, grades=grade(6, int(p.score))) if graded else p
                 for k, p in f.items()}
            for (m, _), p in list(f.items()):
                for _ in range(2):  # about two wrong votes per right one: precision near 1/3
                    f.setdefault((m, rng.randrange(E)),
                                 Prediction(p.distance, 1.0, grades=grade(1)) if graded else p)
                if graded:
                    f.setdefault((m, rng.randrange(E)), Prediction(p.distance, 0.0, grades=grade(10)))
            per_layer.append(f)
        rounds.append(tuple(per_layer))
    return ForecastSchedule(depth, tuple(rounds))
