"""How well expert_aware's forecast of a sequence's next route matches the route it then takes.

    python scripts/route_forecast_overlap.py [--model DIR] [--sequences 16] [--max-tokens 32]

Records fcfs traces of the offload bench's workload (random prompts of 16 tokens, greedy) and
replays each one step at a time through the engine's own RouteRecord and TokenRouteTable
(moe_rt/engine/decode_policy.py): before a step is observed, every decode row's route is forecast
and compared with the route it took (the share of its true experts the forecast names, per layer,
averaged). Printed per trace: the token table's forecast, the sequence's previous route, and, as
an alternative not used by the engine, a table keyed on the previous and the next token. The
record and tables keep learning across the traces in order: the bench's prompts (seed 1) twice,
then new prompts (seed 2), so the second line shows a table that has seen these very sequences.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def overlap(pred, true_row) -> float:
    """Share of the true experts (true_row [L, K]) that pred ([L] sets) names, mean over layers."""
    return float(np.mean([len(p & set(t.tolist())) / len(t) for p, t in zip(pred, true_row)]))


def replay(trace, record, pairs: dict, prompt_len: int) -> dict:
    from moe_rt.engine.decode_policy import TokenRouteTable

    L, E = trace.num_layers, trace.num_experts
    scores = {"token_table": [], "previous_route": [], "token_pair_table": []}
    prev_token: dict[int, int] = {}
    for step in np.unique(trace.steps):
        rows = np.flatnonzero(trace.steps == step)
        for r in rows:
            sid, tok = int(trace.seq_ids[r]), int(trace.token_ids[r])
            if trace.positions[r] < prompt_len or sid not in record.routes:
                continue  # prefill rows are not forecast
            table = record.table.predict(tok)
            if table is None:
                continue
            true = trace.topk_ids[r]
            scores["token_table"].append(overlap(table, true))
            scores["previous_route"].append(overlap(record.routes[sid], true))
            pair = pairs.get((prev_token.get(sid), tok))
            scores["token_pair_table"].append(overlap(pair.predict(0) if pair else table, true))
        idx = torch.from_numpy(rows.astype(np.int64))
        seq_ids, tokens = torch.from_numpy(trace.seq_ids)[idx], torch.from_numpy(trace.token_ids)[idx]
        ids = torch.from_numpy(trace.topk_ids.astype(np.int64))[idx]  # [T, L, K]
        for l in range(L):
            record.observe(l, seq_ids, tokens, ids[:, l])
        for r in rows:
            sid, tok = int(trace.seq_ids[r]), int(trace.token_ids[r])
            key = (prev_token.get(sid), tok)
            if key not in pairs:
                pairs[key] = TokenRouteTable(1, L, E, trace.top_k)
            for l in range(L):
                pairs[key].observe(l, torch.zeros(1, dtype=torch.int64), torch.from_numpy(trace.topk_ids[r, l][None].astype(np.int64)))
            prev_token[sid] = tok
    return {k: {"overlap": round(float(np.mean(v)), 3), "rows": len(v)} for k, v in scores.items() if v}


def main() -> None:
    from moe_rt.engine.decode_policy import RouteRecord, TokenRouteTable
    from moe_rt_app import LLM, SamplingParams
    from moe_rt_app.bench.offload import _prompts
    from moe_rt_app.cli.trace import record_trace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "moe_rt" / "demo_model"))
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    prompt_len = 16
    llm = LLM(args.model, dtype="float32", device="cpu", progress=False, max_num_seqs=args.sequences)
    spec = llm.engine.spec
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    runs = [("bench prompts", 1), ("bench prompts again", 1), ("new prompts", 2)]
    traces = [record_trace(llm, _prompts(args.sequences, prompt_len, spec.vocab_size, seed), params) for _, seed in runs]
    llm.close()
    L = traces[0].num_layers
    record = RouteRecord(L, TokenRouteTable(spec.vocab_size, L, spec.num_experts, spec.top_k))
    pairs: dict = {}
    for (name, _), trace in zip(runs, traces):
        print(json.dumps({"trace": name, **replay(trace, record, pairs, prompt_len)}))


if __name__ == "__main__":
    main()
