"""compile=True (moe_rt/models/compiled_decode.py): whole compiled decode layers give the eager
engine's greedy tokens and its logprobs within 1e-4 in float32 (inductor may sum in another
order), and bfloat16 tokens as accurate as the eager ones; shapes compile a bounded number of
graphs. Few models, few shapes: every graph costs seconds of C++
compilation on a CPU."""
import pytest
import torch

from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams
from moe_rt_app import LLM

PROMPTS = [[5, 17, 42, 9, 77, 3, 12], [101, 7, 64]]


def test_every_attention_compiles_whole_layers(mixtral_dir, tmp_path):
    """Grouped-query and MLA models alike get the compiled decode layers."""
    from checkpoints import write_checkpoint

    llm = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, compile=True)
    assert llm.model.compiled_decode is not None
    mla = LLM(write_checkpoint(tmp_path / "ds", "deepseek_v2"), dtype="float32", device="cpu", progress=False,
              compile=True)
    assert mla.model.compiled_decode is not None


def test_compile_flag(mixtral_dir, capsys):
    from moe_rt_app.cli.main import main

    base = ["generate", "--model", str(mixtral_dir), "--prompt", "In the beginning", "--max-tokens", "4",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu", "--no-stream"]
    assert main(base) == 0
    eager = capsys.readouterr().out
    assert main(base + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert main(base + ["--compile", "--ep", "2"]) == 2
    assert capsys.readouterr().err == "moe-rt: error: --compile runs on one rank; drop it under expert parallelism (--ep > 1)\n"


# compile=True, decode steps of a few tokens: whole compiled layers (moe_rt/models/compiled_decode.py).
# One case per attention and MLP variant the compiled layer has: plain GQA; a shared expert with
# its gate, qkv bias and a dense-MLP layer; per-head q/k norms; full-width norms with clip_qkv;
# a sliding window shorter than the decode; MLA in both rope layouts.
LAYER_CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-window": ("mixtral", {"sliding_window": 5}),
    "qwen2_moe-shared-dense": ("qwen2_moe", {"mlp_only_layers": [0]}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe-clip": ("olmoe", {"clip_qkv": 0.6, "num_experts_per_tok": 3}),
    # MLA over the latent cache: V2 (q_proj, group-limited greedy routing, interleaved rope),
    # V3 (q LoRA, sigmoid routing with a correction bias) with rotate-half rope; both a dense layer 0
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v3-rotate-half": ("deepseek_v3", {"rope_interleave": False}),
}


def _counting(llm) -> list:
    """Calls of llm's compiled decode layer, counted."""
    dec, calls = llm.model.compiled_decode, []
    fn = dec.fn
    dec.fn = lambda *a: (calls.append(1), fn(*a))[1]
    return calls


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_compiled_decode_layers_keep_tokens_and_logprobs(name, tmp_path):
    import torch._dynamo

    from checkpoints import write_checkpoint

    family, over = LAYER_CASES[name]
    folder = write_checkpoint(tmp_path / name, family, seed=3, **over)
    opts = dict(dtype="float32", device="cpu", progress=False, max_num_seqs=2)
    eager, compiled = LLM(folder, **opts), LLM(folder, compile=True, **opts)
    calls = _counting(compiled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # one sequence, then two of different lengths decoding together: 7 (and 3) prompt tokens and
    # 21 new, so the decode crosses the 16-slot block boundary (the key count and the batch are
    # dynamic: no recompile as sequences grow) and outruns the sliding window
    params = SamplingParams(max_tokens=21, temperature=0, ignore_eos=True, logprobs=3)
    for prompts in ([PROMPTS[0]], PROMPTS):
        want = [o.outputs[0] for o in eager.generate(prompts, params)]
        got = [o.outputs[0] for o in compiled.generate(prompts, params)]
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids
            for a, b in zip(g.logprobs, w.logprobs):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert a.top.keys() == b.top.keys()
                assert list(a.top.values()) == pytest.approx(list(b.top.values()), abs=1e-4)
    # every decode step of both runs, every layer, compiled (20 steps each)
    assert len(calls) == 2 * 20 * len(compiled.model.layers)
    kinds = len(set(compiled.model.spec.layer_kinds))
    # per layer kind one decode graph for one token and one for two (prefill stays eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 * kinds


def _mean_error(llm, ref, prompts, params) -> float:
    """Mean |logprob llm reported for a token it decoded - ref's logprob of that token at that
    position| (ref runs the prompt and llm's tokens as one prefill: teacher-forced)."""
    errors = []
    for o in llm.generate(prompts, params):
        c = o.outputs[0]
        n = len(o.prompt_token_ids)
        lp = torch.log_softmax(ref.prompt_logits([*o.prompt_token_ids, *c.token_ids]).float(), -1)
        errors += [abs(got.logprob - lp[n - 1 + j, t].item()) for j, (t, got) in enumerate(zip(c.token_ids, c.logprobs))]
    return sum(errors) / len(errors)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe-shared-dense"])
def test_compiled_decode_layers_in_bfloat16_are_as_accurate_as_eager(name, tmp_path):
    """bfloat16 takes the compiled layers too (inductor computes in float32 between bfloat16
    weights). Rounding differs from the eager bfloat16 layers, so greedy paths may part; each
    path's decoded tokens are scored against the float32 model run teacher-forced, and the
    compiled path's mean logprob error stays within twice the eager bfloat16 path's (+ 0.005). A
    mean, not a worst case: on these random models a near-tie in the router flips now and then
    in either path, and costs one position a large error."""
    from checkpoints import write_checkpoint

    family, over = LAYER_CASES[name]
    folder = write_checkpoint(tmp_path / name, family, seed=3, **over)
    opts = dict(dtype="bfloat16", device="cpu", progress=False, max_num_seqs=2)
    eager, compiled = LLM(folder, **opts), LLM(folder, compile=True, **opts)
    ref = LLM(folder, dtype="float32", device="cpu", progress=False)
    from moe_rt.models.compiled_decode import MAX_ROWS

    assert compiled.model.compiled_decode.max_rows == MAX_ROWS[torch.bfloat16]  # tiny experts: up to 32 tokens
    calls = _counting(compiled)
    params = SamplingParams(max_tokens=21, temperature=0, ignore_eos=True, logprobs=1)
    for prompts in ([PROMPTS[0]], PROMPTS):
        theirs = _mean_error(eager, ref, prompts, params)
        ours = _mean_error(compiled, ref, prompts, params)
        assert ours <= 2 * theirs + 0.005, (ours, theirs)
    assert len(calls) == 2 * 20 * len(compiled.model.layers)  # every decode step compiled


def test_rows_limit_keeps_a_batch_s_expert_reads_in_cache():
    from moe_rt.models.compiled_decode import MAX_ROWS, rows_limit

    MiB = 1 << 20
    assert rows_limit(int(1.5 * MiB), 2, 32 * MiB) == MAX_ROWS[torch.float32]  # mixtral-56m: 10 would fit
    assert rows_limit(int(0.75 * MiB), 2, 32 * MiB, MAX_ROWS[torch.bfloat16]) == 21  # its bfloat16 experts
    assert rows_limit(4 * MiB, 2, 32 * MiB) == 4
    assert rows_limit(42 * MiB, 2, 32 * MiB) == 1  # mixtral-gpu: one token only
    assert rows_limit(0, 8, 0) == 1


def test_compiled_decode_takes_up_to_max_rows(mixtral_dir):
    """A decode batch over MAX_ROWS tokens takes the eager layers (the grouped expert loop reads
    each used expert once); at MAX_ROWS, the compiled ones. Tokens equal either way."""
    from moe_rt.models.compiled_decode import MAX_ROWS

    most = MAX_ROWS[torch.float32]  # float32
    opts = dict(dtype="float32", device="cpu", progress=False, max_num_seqs=most + 1)
    eager, compiled = LLM(mixtral_dir, **opts), LLM(mixtral_dir, compile=True, **opts)
    assert compiled.model.compiled_decode.max_rows == most  # tiny experts
    calls = _counting(compiled)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for n, compiled_steps in ((most + 1, 0), (most, 2)):
        prompts = [[5 + i, 17, 42 + 3 * i] for i in range(n)]
        calls.clear()
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        assert [o.outputs[0].token_ids for o in compiled.generate(prompts, params)] == want
        assert len(calls) == compiled_steps * len(compiled.model.layers)


def test_compiled_decode_steps_aside_for_routing_observers(mixtral_dir):
    """An observer wants every layer's RouterEvent: the eager layers run while it listens."""
    llm = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, compile=True)
    calls = _counting(llm)
    events = []
    off = llm.model.hub.subscribe(events.append)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    try:
        with_observer = llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids
    finally:
        off()
    assert not calls and len(events) == 4 * len(llm.model.moe_blocks())
    assert llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids == with_observer
    assert len(calls) == 3 * len(llm.model.layers)


def test_compiled_decode_past_the_recompile_limit_runs_eagerly(mixtral_dir):
    """Each model compiles into a cache of its own, and a shape past dynamo's recompile limit runs
    the same layer function eagerly: tokens unchanged, no failure mid-generation."""
    import torch._dynamo

    opts = dict(dtype="float32", device="cpu", progress=False, max_num_seqs=2)
    eager, compiled = LLM(mixtral_dir, **opts), LLM(mixtral_dir, compile=True, **opts)
    other = LLM(mixtral_dir, compile=True, **opts)
    assert compiled.model.compiled_decode.fn is not other.model.compiled_decode.fn
    # under names of their own too: dynamo keeps which sizes changed per code name, so with a shared
    # one a second model's sizes would compile as dynamic (slower, differently rounded loops)
    names = {llm.model.compiled_decode.fn._torchdynamo_orig_callable.__code__.co_name for llm in (compiled, other)}
    assert len(names) == 2
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    calls = _counting(compiled)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with torch._dynamo.config.patch(recompile_limit=1):  # (config.patch restores it; setattr would not)
        for prompts in ([PROMPTS[0]], PROMPTS):  # one token a step (compiled), then two (over the limit)
            want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
            assert [o.outputs[0].token_ids for o in compiled.generate(prompts, params)] == want
    assert len(calls) == 2 * 3 * len(compiled.model.layers)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1



def test_warm_up_compiles_every_decode_graph_before_the_first_request(mixtral_dir):
    """LLM.warm_up (what `moe-rt serve --compile` runs before it listens) compiles one graph per
    batch range; decoding any batch up to max_rows then compiles nothing, with the eager tokens;
    the engine is left as it was (no request, KV blocks free, step count and sampler unchanged)."""
    import torch._dynamo

    from moe_rt.models.compiled_decode import MAX_ROWS

    most = MAX_ROWS[torch.float32]  # float32
    opts = dict(dtype="float32", device="cpu", progress=False, max_num_seqs=most)
    eager, compiled = LLM(mixtral_dir, **opts), LLM(mixtral_dir, compile=True, **opts)
    engine = compiled.engine
    rng = engine.generator.get_state()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compiled.warm_up() == [1, 2, 5]  # one token, 2..4 (row reductions), 5..MAX_ROWS
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    stats = engine.stats()
    assert stats.num_steps == 0 and stats.last_batch_size == 0 and not stats.active_requests
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert torch.equal(engine.generator.get_state(), rng)
    calls = _counting(compiled)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    for n in (1, 3, most):
        prompts = [[5 + i, 17, 42 + 3 * i] for i in range(n)]
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        assert [o.outputs[0].token_ids for o in compiled.generate(prompts, params)] == want
    assert len(calls) == 3 * 4 * len(compiled.model.layers)  # every decode step took the graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # none compiled on the way
    assert eager.warm_up() == []  # nothing compiled: nothing to warm
    compiled.engine.add_request([5, 17], SamplingParams(max_tokens=2))
    with pytest.raises(MoeRtError, match="warm_up runs before any request is added"):
        compiled.warm_up()


def test_warm_up_leaves_an_engine_whose_steps_stay_eager(mixtral_dir):
    """With an expert cache the decode steps stay eager, and warm-up steps would count as cache
    traffic: warm_up does nothing. A one-sequence engine warms the one-token graph only."""
    cached = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, compile=True,
                 cache=dict(offload="cpu", capacity_slots=2))
    assert cached.warm_up() == []
    assert cached.expert_cache.stats()["loads"] == 0
    one = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, compile=True, max_num_seqs=1)
    assert one.warm_up() == [1]
