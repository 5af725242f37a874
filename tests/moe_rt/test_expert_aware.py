"""expert_aware moves only timing: every sequence's tokens are fcfs's, under an expert cache, with
several sequences running, finishing at different times, and waiting their turn."""
import argparse

import pytest

from checkpoints import write_checkpoint
from moe_rt.engine.expert_groups import StepCosts
from moe_rt_app import LLM, SamplingParams
from moe_rt_app.cli.flags import add_model_arguments, config_from_args

PROMPTS = [[5, 6, 7, 8, 9], [10, 20, 30], [100, 3, 44, 55, 66, 77, 88], [7, 7, 7], [9, 8, 7, 6, 5, 4],
           [40, 41], [200, 201, 202, 203], [60]]
CACHE = dict(offload="disk", capacity_slots=2, policy="lru")


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("mix4ea"), "mixtral", num_hidden_layers=4))


class _Costs:
    """Stand-in for StepCostModel and ShrinkGate: fixed costs, shrinking always allowed, so the
    decisions do not hang on timing."""
    shrink = True

    def __init__(self, costs):
        self.costs = costs

    def add(self, *sample):
        pass

    def estimate(self):
        return self.costs

    def stats(self):
        return {}


def _run(model, params, costs=None, **opts):
    llm = LLM(model, dtype="float32", device="cpu", progress=False, cache=CACHE, **opts)
    try:
        if costs is not None:
            llm.engine.scheduler.policy.costs = llm.engine.scheduler.policy.gate = _Costs(costs)
        outs = llm.generate(PROMPTS, params)
        return [[c.token_ids for c in o.outputs] for o in outs], llm.engine.moe_stats()
    finally:
        llm.close()


def _params():
    # lengths differ, so sequences finish at different steps and others are admitted
    return [SamplingParams(max_tokens=6 + 2 * (i % 4), temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("batch,max_skips", [(2, 2), (3, 1)])
def test_greedy_tokens_equal_fcfs(model4, batch, max_skips):
    fcfs, stats = _run(model4, _params())
    assert "scheduler" not in stats
    ea, stats = _run(model4, _params(), scheduler_policy="expert_aware", expert_aware_batch=batch,
                     expert_aware_max_skips=max_skips, max_num_seqs=6)
    assert ea == fcfs
    s = stats["scheduler"]
    assert s["partial_steps"] > 0 and s["skipped_sequence_steps"] > 0  # sequences really waited
    assert 1 <= s["max_consecutive_skips"] <= max_skips  # and never longer than the bound


@pytest.mark.parametrize("max_skips", [1, 3])
def test_throughput_choice_shrinks_when_loads_dominate_and_keeps_tokens(model4, max_skips):
    """Without a batch size the policy picks the fastest batch under the step costs; with reads
    all that a step costs it steps sequences that share experts, and tokens stay fcfs's."""
    fcfs, _ = _run(model4, _params())
    ea, stats = _run(model4, _params(), costs=StepCosts(0.0, 0.0, 1.0), scheduler_policy="expert_aware",
                     expert_aware_max_skips=max_skips, max_num_seqs=6)
    assert ea == fcfs
    s = stats["scheduler"]
    assert s["partial_steps"] > 0 and 1 <= s["max_consecutive_skips"] <= max_skips


def test_throughput_choice_measures_the_step_and_the_cache(model4):
    """Measured costs: the cache's loads are timed through its probe; tokens stay fcfs's."""
    fcfs, _ = _run(model4, _params())
    ea, stats = _run(model4, _params(), scheduler_policy="expert_aware", max_num_seqs=6)
    assert ea == fcfs
    s = stats["scheduler"]
    assert s["step_fixed_ms"] > 0 and s["expert_read_ms"] > 0 and s["step_token_ms"] >= 0


def test_seeded_sampling_is_unchanged_too(model4):
    """A seeded request draws from its own generator, so when its tokens are computed does not
    change which tokens it draws."""
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=17 + i, n=2 if i == 1 else 1,
                             ignore_eos=True) for i in range(len(PROMPTS))]
    fcfs, _ = _run(model4, params)
    ea, _ = _run(model4, params, scheduler_policy="expert_aware", expert_aware_batch=2)
    assert ea == fcfs


def test_flags_set_the_engine_fields():
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    args = p.parse_args(["--model", "m", "--scheduler-policy", "expert_aware", "--expert-aware-batch", "4",
                         "--expert-aware-max-skips", "2", "--dynamic-topk-threshold", "0.1",
                         "--dynamic-topk-top-p", "0.9"])
    e = config_from_args(args).engine
    assert (e.scheduler_policy, e.expert_aware_batch, e.expert_aware_max_skips) == ("expert_aware", 4, 2)
    assert (e.dynamic_topk_threshold, e.dynamic_topk_top_p) == (0.1, 0.9)
    assert config_from_args(p.parse_args(["--model", "m"])).engine.scheduler_policy == "fcfs"
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--dynamic-topk-threshold", "1"])


def test_expert_parallelism_keeps_fcfs():
    from moe_rt.errors import MoeRtError
    from moe_rt_app.config import build_config

    with pytest.raises(MoeRtError, match="expert_aware runs on one rank"):
        build_config(model="m", scheduler_policy="expert_aware", parallel={"ep": 2})
    assert build_config(model="m", parallel={"ep": 2}).engine.scheduler_policy == "fcfs"
