"""Regrouping a trace into the steps a scheduling policy takes: every row once, each sequence's
tokens in order, fcfs reproducing the engine's own batches, expert_aware batching sequences that
share experts, the engine making the very decisions replay makes, and the CLI."""
import json

import numpy as np
import pytest

from expert_cache.schedule_replay import schedule_trace
from expert_cache.simulator import BatchNeeds
from moe_rt.errors import MoeRtError
from moe_rt_app.cli.main import main as cli_main
from router_predict.trace import Trace, TraceMeta, save_trace, step_bounds

L, E, K = 2, 8, 2


def clustered_trace(num_seqs=6, prompt=3, decode=5) -> Trace:
    """As the engine records fcfs with every sequence running: step 0 prefills all prompts, then
    each step decodes one row per sequence. Even sequences use experts {0, 1} (tokens 10..19),
    odd ones {4, 5} (tokens 20..29), at both layers."""
    rows = []  # (seq, position, step, token, experts)
    for s in range(num_seqs):
        for p in range(prompt):
            rows.append((s, p, 0))
    for d in range(decode):
        for s in range(num_seqs):
            rows.append((s, prompt + d, d + 1))
    seq = np.array([r[0] for r in rows], np.int64)
    ids = np.array([[[0, 1]] * L if s % 2 == 0 else [[4, 5]] * L for s in seq], np.int32)
    tokens = np.array([(10 if s % 2 == 0 else 20) + (p % 10) for s, p, _ in rows], np.int64)
    return Trace(ids, np.full(ids.shape, 0.5, np.float32), seq, np.array([r[1] for r in rows], np.int64),
                 np.array([r[2] for r in rows], np.int64), TraceMeta(E, K, tuple(range(L)), "synthetic"),
                 token_ids=tokens)


def _steps(trace: Trace) -> list[set[tuple[int, int]]]:
    return [set(zip(trace.seq_ids[a:b].tolist(), trace.positions[a:b].tolist()))
            for _, a, b in step_bounds(trace.steps)]


@pytest.mark.parametrize("policy,conc,size", [("fcfs", 6, None), ("fcfs", 4, 2), ("expert_aware", 6, 2),
                                              ("expert_aware", 3, 1), ("expert_aware", 5, None)])
def test_every_row_once_and_each_sequence_in_order(policy, conc, size):
    t = clustered_trace()
    st = schedule_trace(t, policy, conc, size, max_skips=2)
    out = st.trace
    assert sorted(zip(out.seq_ids.tolist(), out.positions.tolist())) == sorted(zip(t.seq_ids.tolist(), t.positions.tolist()))
    assert (np.diff(out.steps) >= 0).all() and out.steps[0] == 0
    for s in range(6):
        assert (np.diff(out.positions[out.seq_ids == s]) > 0).all()
    for rows in _steps(out):  # one decode row per stepping sequence, besides prefills
        decodes = [r for r in rows if r[1] >= 3]
        # fcfs: at most `size`; expert_aware may exceed it only to serve sequences at the skip bound
        assert len(decodes) == len({s for s, _ in decodes}) <= (size or conc if policy == "fcfs" else conc)
    assert st.decode_tokens == 30 and st.max_consecutive_skips <= 2


def test_fcfs_with_everything_running_is_the_recorded_schedule():
    t = clustered_trace()
    st = schedule_trace(t, "fcfs", 6)
    assert _steps(st.trace) == _steps(t)
    assert BatchNeeds.from_trace(st.trace) == BatchNeeds.from_trace(t)
    assert st.decode_union == 4.0  # both clusters every step


def test_expert_aware_batches_a_cluster_together():
    st = schedule_trace(clustered_trace(), "expert_aware", 6, 3, max_skips=2)
    assert st.decode_union == 2.0  # every decode step is one cluster
    for rows in _steps(st.trace)[1:]:
        assert len({s % 2 for s, _ in rows}) == 1


def test_bad_arguments_are_refused():
    with pytest.raises(MoeRtError, match="unknown schedule"):
        schedule_trace(clustered_trace(), "sjf", 4)
    with pytest.raises(MoeRtError):
        schedule_trace(clustered_trace(), "fcfs", 0)


def test_engine_takes_the_decisions_replay_takes(tmp_path):
    """The engine under expert_aware, traced, runs exactly the steps that replaying its fcfs trace
    under expert_aware produces: the runtime and replay share RouteRecord and BatchChooser."""
    from checkpoints import write_checkpoint
    from moe_rt_app import LLM, SamplingParams
    from moe_rt_app.cli.trace import record_trace

    model = str(write_checkpoint(tmp_path / "m", "mixtral", num_hidden_layers=3))
    prompts = [[5, 6, 7, 8, 9], [10, 20, 30], [100, 3, 44, 55], [7, 7, 7], [9, 8, 7, 6], [40, 41], [60]]
    params = [SamplingParams(max_tokens=5 + 2 * (i % 3), temperature=0, ignore_eos=True) for i in range(len(prompts))]
    traces = {}
    for policy in ("fcfs", "expert_aware"):
        llm = LLM(model, dtype="float32", device="cpu", progress=False, max_num_seqs=5, scheduler_policy=policy,
                  expert_aware_batch=2, expert_aware_max_skips=2)
        traces[policy] = record_trace(llm, prompts, params)
        llm.close()
    replayed = schedule_trace(traces["fcfs"], "expert_aware", 5, 2, max_skips=2)
    assert _steps(replayed.trace) == _steps(traces["expert_aware"])
    assert schedule_trace(traces["fcfs"], "fcfs", 5).trace.steps.tolist() == traces["fcfs"].steps.tolist()


def test_simulate_cache_replays_a_schedule(tmp_path, capsys):
    path = tmp_path / "t.npz"
    save_trace(str(path), clustered_trace())
    assert cli_main(["simulate-cache", "--trace", str(path), "--capacity", "2", "--schedule", "expert_aware",
                     "--concurrency", "6", "--step-size", "3", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    sc = report["schedule"]
    assert sc["distinct_experts_per_layer_step"] == 2.0 and sc["decode_tokens"] == 30
    ea = report["policies"]["lru"]["loads_per_decode_token"]
    assert cli_main(["simulate-cache", "--trace", str(path), "--capacity", "2", "--schedule", "fcfs",
                     "--concurrency", "6", "--json", "--no-progress"]) == 0
    fcfs = json.loads(capsys.readouterr().out)["policies"]["lru"]["loads_per_decode_token"]
    assert ea < fcfs  # two slots hold one cluster: stepping clusters apart stops the thrashing
    assert cli_main(["simulate-cache", "--trace", str(path), "--capacity", "2", "--step-size", "3"]) == 2
    assert "--step-size is for --schedule" in capsys.readouterr().err
