"""The engine on a real tiny checkpoint: continuous batching, preemption, abort, stop rules,
seeds, n, logprobs and streaming, each checked against a slower obviously-right path."""
import dataclasses

import pytest
import torch

from moe_rt_app import LLM, MoeRtError, SamplingParams

PROMPTS = ["In the beginning God", "And the earth was", "Hello world", "darkness was upon the face"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def manual_greedy(llm, prompt: str, n: int) -> list[int]:
    """Greedy decoding by re-scoring the whole sequence every step: no KV cache, no batching."""
    ids = llm.tokenizer.encode(prompt)
    out = []
    for _ in range(n):
        t = int(llm.prompt_logits(ids + out)[-1].argmax())
        out.append(t)
    return out


def test_greedy_matches_cache_free_reference(mixtral_llm):
    outs = mixtral_llm.generate(PROMPTS, GREEDY)
    for prompt, o in zip(PROMPTS, outs):
        assert o.token_ids == manual_greedy(mixtral_llm, prompt, 12)
        assert o.finish_reason == "length"


def test_requests_join_the_running_batch(mixtral_llm):
    eng = mixtral_llm.engine
    first = eng.add_request(PROMPTS[0], GREEDY)
    eng.step()  # prefill of the first request
    eng.step()  # decode with batch 1
    assert eng.last_batch_size == 1
    later = [eng.add_request(p, GREEDY) for p in PROMPTS[1:]]
    sizes, done = [], {}
    while eng.has_unfinished():
        done.update((o.request_id, o) for o in eng.step().finished)
        sizes.append(eng.last_batch_size)
    assert max(sizes) == len(PROMPTS)  # the late requests were decoded together with the first
    outs = [done[r] for r in [first] + later]
    assert [o.token_ids for o in outs] == [o.token_ids for o in mixtral_llm.generate(PROMPTS, GREEDY)]


def test_full_kv_cache_preempts_and_recomputes_with_identical_output(mixtral_dir, mixtral_llm):
    # 6 blocks of 4 tokens = 24 slots; four ~8-token prompts growing by 12 tokens cannot all fit.
    a = mixtral_llm.model.spec.attention
    per_block = 2 * 2 * 4 * a.num_kv_heads * a.head_dim * 4
    small = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, kv_block_size=4,
                kv_cache_memory_gb=6 * per_block / 2**30, max_model_len=24)
    outs = small.generate(PROMPTS, GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in mixtral_llm.generate(PROMPTS, GREEDY)]
    assert small.engine.blocks.num_free == small.engine.blocks.num_blocks  # every block came back


def test_garbage_in_unused_kv_slots_cannot_leak_into_outputs(mixtral_dir, mixtral_llm):
    # Slots past a sequence's length and padding blocks are masked, but a masked NaN still
    # multiplies its attention weight: the runner must never hold non-finite values there.
    llm = LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, kv_block_size=4, max_model_len=64,
              kv_cache_memory_gb=40 * 2 * 2 * 4 * 2 * 16 * 4 / 2**30)
    for kv in llm.engine.runner.kv:
        assert torch.isfinite(kv.k).all() and torch.isfinite(kv.v).all()
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in mixtral_llm.generate(PROMPTS, GREEDY)]


def test_abort_frees_blocks_and_finishes_request(mixtral_llm):
    eng = mixtral_llm.engine
    free0 = eng.blocks.num_free
    rid = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, n=2))
    eng.step()
    assert eng.blocks.num_free < free0
    seqs = eng.requests[rid]
    assert eng.abort(rid)  # ends the request and forgets it in one call
    assert eng.blocks.num_free == free0
    assert not eng.has_unfinished() and rid not in eng.requests and rid not in eng.stats().active_requests
    assert [s.finish_reason for s in seqs] == ["abort", "abort"]
    assert not eng.abort(rid)  # already gone
    assert not eng.abort("no-such-request")
    assert eng.step().finished == []  # an aborted request is never reported by step


def test_a_request_leaves_the_engine_in_the_step_its_last_sequence_finishes(mixtral_llm):
    """The one finished-request rule: step() returns the final output of a request exactly once,
    in the step where its last sequence ends, and the engine holds it no more."""
    eng = mixtral_llm.engine
    free0 = eng.blocks.num_free
    short = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    mixed = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=5, temperature=1.0, seed=5, n=2, ignore_eos=True))
    # its first completion ends three steps before the second, and so before the request does
    eng.requests[mixed][0].params = dataclasses.replace(eng.requests[mixed][0].params, max_tokens=2)
    seen: dict[str, list[int]] = {}  # request id -> the steps that reported it finished
    ended_seqs: dict[tuple, int] = {}  # (request id, index) -> step its sequence ended
    step = 0
    while eng.has_unfinished():
        step += 1
        res = eng.step()
        for o in res.outputs:
            if o.finish_reason is not None:
                ended_seqs[(o.request_id, o.index)] = step
        for out in res.finished:
            seen.setdefault(out.request_id, []).append(step)
            assert out.finished and out.request_id not in eng.requests
            assert out.request_id not in eng.stats().active_requests
        assert set(eng.requests) == {short, mixed} - set(seen)  # everything still held is unfinished
    assert ended_seqs[(mixed, 0)] < ended_seqs[(mixed, 1)]
    assert seen == {short: [ended_seqs[(short, 0)]], mixed: [ended_seqs[(mixed, 1)]]}
    assert eng.blocks.num_free == free0 and eng.step().finished == []


def test_max_tokens_stop_token_ids_and_eos(mixtral_llm):
    base = mixtral_llm.generate(PROMPTS[0], GREEDY)[0].token_ids
    stop_at = base[5]
    first = base.index(stop_at)
    o = mixtral_llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))[0]
    assert o.token_ids == base[: first + 1] and o.finish_reason == "stop"
    # the engine's EOS ends a request unless ignore_eos is set
    eos = 2
    eng = mixtral_llm.engine
    assert eos in eng.eos_ids


def test_stop_strings_cut_text_and_streaming_never_retracts(mixtral_llm):
    full = mixtral_llm.generate(PROMPTS[2], GREEDY)[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = full[: full.index(stop)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    o = mixtral_llm.generate(PROMPTS[2], params)[0]
    assert o.text == cut and o.finish_reason == "stop"
    assert "".join(mixtral_llm.stream(PROMPTS[2], params)) == cut


def test_stream_pieces_concatenate_to_generate_text(mixtral_llm):
    pieces = list(mixtral_llm.stream(PROMPTS[3], GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == mixtral_llm.generate(PROMPTS[3], GREEDY)[0].text
    assert not mixtral_llm.engine.requests  # nothing left behind


def test_stream_left_early_aborts_its_request(mixtral_llm):
    eng = mixtral_llm.engine
    free0 = eng.blocks.num_free
    pieces = mixtral_llm.stream(PROMPTS[3], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    next(pieces)
    assert eng.has_unfinished()
    pieces.close()
    assert not eng.requests and not eng.has_unfinished() and eng.blocks.num_free == free0


def test_step_outputs_carry_the_logprobs_of_their_tokens(mixtral_llm):
    eng = mixtral_llm.engine
    rid = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, logprobs=2, ignore_eos=True))
    plain = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    streamed, final = [], None
    while eng.has_unfinished():
        res = eng.step()
        for o in res.outputs:
            if o.request_id == plain:
                assert o.logprobs is None
            else:
                assert len(o.logprobs) == len(o.new_token_ids) == 1 and o.logprobs[0].token_id == o.new_token_ids[0]
                streamed += o.logprobs
        final = next((f for f in res.finished if f.request_id == rid), final)
    assert streamed == final.outputs[0].logprobs and len(streamed) == 5


def test_seeded_sampling_is_reproducible_and_batch_independent(mixtral_llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    alone = mixtral_llm.generate(PROMPTS[0], p)[0].token_ids
    batched = mixtral_llm.generate(PROMPTS, [p, GREEDY, GREEDY, GREEDY])[0].token_ids
    assert alone == batched
    other = mixtral_llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=1.0, seed=124, ignore_eos=True))
    assert other[0].token_ids != alone


def test_n_completions_and_logprobs(mixtral_llm):
    p = SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=3, logprobs=3, ignore_eos=True)
    out = mixtral_llm.generate(PROMPTS[1], p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    c = out.outputs[0]
    ids = out.prompt_token_ids + c.token_ids
    logits = mixtral_llm.prompt_logits(ids)
    for i, lp in enumerate(c.logprobs):
        ref = torch.log_softmax(logits[len(out.prompt_token_ids) + i - 1], -1)
        assert lp.token_id == c.token_ids[i]
        assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-4
        assert list(lp.top) == ref.topk(3).indices.tolist()


def test_chat_applies_template(mixtral_llm):
    msgs = [{"role": "user", "content": "hi"}]
    text = mixtral_llm.tokenizer.apply_chat_template(msgs)
    assert text == "<s>user: hi\nassistant:"
    out = mixtral_llm.chat(msgs, GREEDY)
    assert out.prompt_token_ids == mixtral_llm.tokenizer.encode("user: hi\nassistant:")
    assert out.token_ids == mixtral_llm.generate(out.prompt_token_ids, GREEDY)[0].token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n must"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(MoeRtError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_leave_no_state(mixtral_llm):
    eng = mixtral_llm.engine
    with pytest.raises(MoeRtError, match="empty"):
        mixtral_llm.generate([[]], GREEDY)
    with pytest.raises(MoeRtError, match="token ids"):
        mixtral_llm.generate([[1, 10**6]], GREEDY)
    with pytest.raises(MoeRtError, match="context"):
        mixtral_llm.generate([[5] * (eng.max_model_len + 1)], GREEDY)
    assert not eng.has_unfinished() and not eng.requests
    with pytest.raises(MoeRtError, match="messages must not be empty"):
        mixtral_llm.chat([], GREEDY)


def test_unknown_engine_option_is_a_clear_error(mixtral_dir):
    with pytest.raises(MoeRtError, match="max_num_seqz"):
        LLM(mixtral_dir, max_num_seqz=3, progress=False)


def test_kv_budget_below_one_block_is_refused(mixtral_dir):
    # A budget that buys no block used to build an engine with a zero-token context that served
    # every request an error; it must be refused at construction, naming the option.
    with pytest.raises(MoeRtError, match="kv_cache_memory_gb"):
        LLM(mixtral_dir, dtype="float32", device="cpu", progress=False, kv_cache_memory_gb=1e-7)
