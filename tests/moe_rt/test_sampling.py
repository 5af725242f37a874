"""Per-request sampling: parameter validation, the sampler against transformers' own logits
processors, guided (JSON-mode) choice with a stand-in guide, and per-request failure isolation in
the engine, on the tiny real checkpoint."""
import json
import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from moe_rt import MoeRtError, SamplingParams
from moe_rt.engine.sampler import apply_penalties, draw, filter_logits_batch, sample
from moe_rt.engine.sequence import Sequence
from moe_rt.sampling_params import SEED_MAX, SEED_MIN

PROMPTS = ["In the beginning God", "And the earth was", "Hello world", "darkness was upon the face"]
GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


def seq(params: SamplingParams, prompt=(1, 2), output=(), generator=None) -> Sequence:
    s = Sequence(0, "r", 0, list(prompt), params, generator)
    s.token_ids += list(output)
    return s


class SetGuide:
    """Stand-in for JsonObjectGuide: allows a fixed token set; complete after `complete_after` tokens."""

    def __init__(self, allowed, complete_after=None, eos=()):
        self.allowed, self.complete_after, self.eos, self.seen = set(allowed), complete_after, set(eos), []

    def allows(self, t: int) -> bool:
        return t in (self.allowed | self.eos if self.complete else self.allowed)

    def advance(self, t: int) -> None:
        assert self.allows(t)
        self.seen.append(t)

    @property
    def complete(self) -> bool:
        return self.complete_after is not None and len(self.seen) >= self.complete_after


# -- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": math.nan}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"logit_bias": {5: 101}}, r"logit_bias\[5\]"),
        ({"logit_bias": {5: math.nan}}, r"logit_bias\[5\]"),
        ({"logit_bias": {-1: 1}}, "logit_bias keys"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys"),
        ({"logit_bias": [1, 2]}, "logit_bias must map"),
        ({"response_format": "yaml"}, "response_format"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": SEED_MAX, "n": 2}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
    ],
)
def test_bad_sampling_params_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(MoeRtError, match=message):
        SamplingParams(**kwargs)


def test_param_normalisation_and_greedy_cut_off():
    assert SamplingParams(logit_bias={"7": 3, 9: -1}).logit_bias == {7: 3.0, 9: -1.0}  # OpenAI sends string keys
    assert SamplingParams(temperature=1e-50).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert not SamplingParams().penalised and SamplingParams(presence_penalty=0.1).penalised


def test_every_accepted_seed_is_one_torch_accepts():
    # torch takes [-2**63, 2**64 - 1] (negatives wrap); SamplingParams admits only int64, seed+n-1 included.
    for seed, n in [(SEED_MIN, 3), (SEED_MAX, 1), (SEED_MAX - 1, 2), (0, 1)]:
        SamplingParams(seed=seed, n=n)
        for i in range(n):
            torch.Generator().manual_seed(seed + i)


# -- the sampler against transformers -----------------------------------------------------------
def hf_warp(row, temperature, top_k, top_p, min_p):
    procs = [TemperatureLogitsWarper(temperature)]
    procs += [TopKLogitsWarper(top_k)] if top_k > 0 else []
    procs += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    procs += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    return LogitsProcessorList(procs)(torch.zeros(1, 1, dtype=torch.long), row[None].clone())[0]


def test_filters_match_transformers_warpers_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 320, generator=g) * 3
    rows = [(1.0, 0, 1.0, 0.0), (0.7, 40, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.1),
            (0.5, 20, 0.8, 0.05), (2.0, 5, 0.3, 0.5), (1.0, 0, 0.999, 0.0), (0.9, 320, 1.0, 1.0)]
    out = filter_logits_batch(logits, *map(list, zip(*rows)))
    for i, (t, k, p, m) in enumerate(rows):
        ref = hf_warp(logits[i], t, k, p, m)
        assert torch.equal(torch.isfinite(out[i]), torch.isfinite(ref)), f"row {i}: kept sets differ"
        torch.testing.assert_close(out[i].softmax(-1), ref.softmax(-1))


def test_repetition_penalty_matches_transformers_after_logit_bias():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g) * 4
    p1 = SamplingParams(repetition_penalty=1.7)
    p2 = SamplingParams(repetition_penalty=0.6, logit_bias={3: 5.0, 4: -2.5})
    seqs = [seq(p1, [5, 6, 7], [7, 8, 40]), seq(p2, [3, 9], [4, 4]), seq(SamplingParams(), [1], [2])]
    out = apply_penalties(logits, seqs)
    for i, s in enumerate(seqs[:2]):
        biased = logits[i].clone()
        for t, b in s.params.logit_bias.items():
            biased[t] += b
        ref = RepetitionPenaltyLogitsProcessor(s.params.repetition_penalty)(torch.tensor([s.token_ids]), biased[None])[0]
        torch.testing.assert_close(out[i], ref)
    assert torch.equal(out[2], logits[2])  # neutral parameters leave the row alone


def test_presence_and_frequency_penalties_follow_openai_on_output_tokens_only():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(torch.zeros(1, 5), [seq(p, prompt=[0, 0], output=[3, 3, 1])])
    # token 3: 0.5 + 2 * 0.25; token 1: 0.5 + 0.25; prompt token 0 is not counted
    assert out[0].tolist() == [0.0, -0.75, 0.0, -1.0, 0.0]
    neg = SamplingParams(presence_penalty=-2, frequency_penalty=-2)  # negative values encourage repeats
    assert apply_penalties(torch.zeros(1, 3), [seq(neg, output=[2])])[0].tolist() == [0.0, 0.0, 4.0]


def test_greedy_rows_take_the_argmax_of_penalised_logits_and_plain_rows_are_untouched():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    seqs = [seq(SamplingParams(temperature=0)),
            seq(SamplingParams(temperature=0, logit_bias={0: 5})),
            seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[1])]  # 3 / 2 < 2
    assert sample(logits, seqs, torch.Generator()) == [1, 0, 2]


def test_extreme_but_valid_parameters_never_produce_nan_or_crash():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 64, generator=g) * 30
    logits[4] = -50.0  # every logit negative and every token seen: a huge repetition penalty -> -inf
    params = [SamplingParams(temperature=1e-50),  # greedy
              SamplingParams(temperature=1e-5, top_p=1e-9, min_p=1.0, top_k=1),
              SamplingParams(temperature=1e-5, repetition_penalty=1e-30),
              SamplingParams(temperature=100.0, min_p=1.0),
              SamplingParams(temperature=1e-5, repetition_penalty=1e30)]
    seqs = [seq(p, prompt=list(range(64))) for p in params]
    tokens = sample(logits, seqs, torch.Generator().manual_seed(3))
    assert all(isinstance(t, int) and 0 <= t < 64 for t in tokens)
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == int(logits[1].argmax())  # the filters always keep the best token
    assert tokens[3] == int(logits[3].argmax())


def test_draw_follows_the_cdf_and_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]])
    n = 1000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spread quantiles
    got = torch.stack([draw(probs, u[i : i + 1]) for i in range(n)]).flatten()
    counts = torch.bincount(got, minlength=6).tolist()
    assert counts == [0, 200, 0, 500, 300, 0]
    assert int(draw(probs, torch.tensor([1 - 2**-53]))) == 4  # rounding up at the top stays on mass


def test_seeded_draws_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 100, generator=g)
    p = SamplingParams(temperature=0.8, top_p=0.9, min_p=0.02, seed=11, presence_penalty=0.3)
    alone = sample(logits[2:3], [seq(p, generator=torch.Generator().manual_seed(11))], torch.Generator())
    mixed = [seq(SamplingParams(temperature=1.0)), seq(SamplingParams(temperature=0)),
             seq(p, generator=torch.Generator().manual_seed(11)), seq(SamplingParams(top_k=3))]
    assert sample(logits, mixed, torch.Generator())[2] == alone[0]


# -- guided choice (JSON mode) with a stand-in guide --------------------------------------------
def test_guided_greedy_takes_the_best_allowed_token_and_advances_the_guide():
    s = seq(SamplingParams(temperature=0))
    s.guide = SetGuide({0, 2})
    assert sample(torch.tensor([[1.0, 9.0, 5.0, 7.0]]), [s], torch.Generator()) == [2]
    assert s.guide.seen == [2]


def test_guided_sampling_draws_from_the_distribution_restricted_to_allowed_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, 3.0, -1.0]])
    allowed = [1, 3, 5]
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(6)
    for _ in range(n):
        s = seq(SamplingParams(temperature=1.0))
        s.guide = SetGuide(allowed)
        counts[sample(logits, [s], gen)[0]] += 1
    want = torch.zeros(6)
    want[allowed] = logits[0, allowed].softmax(-1)
    assert counts[[0, 2, 4]].sum() == 0
    torch.testing.assert_close(counts / n, want, atol=0.025, rtol=0)


def test_guided_choice_ends_with_eos_once_complete_and_fails_alone_when_nothing_is_allowed():
    logits = torch.tensor([[5.0, 1.0, 0.0, 2.0], [5.0, 1.0, 0.0, 2.0], [5.0, 1.0, 0.0, 2.0]])
    done = seq(SamplingParams(temperature=0))
    done.guide = SetGuide({0, 1}, complete_after=0, eos={2})
    stuck = seq(SamplingParams(temperature=1.0))
    stuck.guide = SetGuide(set())
    plain = seq(SamplingParams(temperature=0))
    out = sample(logits, [done, stuck, plain], torch.Generator(), eos_ids={2})
    assert out[0] == 2  # EOS although token 0 scores higher: the object is closed
    assert isinstance(out[1], MoeRtError) and "JSON" in str(out[1])
    assert out[2] == 0


# -- through the engine -------------------------------------------------------------------------
def penalised_greedy(llm, prompt: str, n: int, rep: float) -> list[int]:
    """Greedy with transformers' repetition penalty, re-scoring the whole sequence every step."""
    ids = llm.tokenizer.encode(prompt)
    proc = RepetitionPenaltyLogitsProcessor(rep)
    for _ in range(n):
        scores = proc(torch.tensor([ids]), llm.prompt_logits(ids)[-1:].clone())
        ids.append(int(scores.argmax()))
    return ids[-n:]


def test_repetition_penalty_breaks_a_repeating_greedy_continuation(mixtral_llm):
    plain = mixtral_llm.generate(PROMPTS[2], SamplingParams(**GREEDY))[0].token_ids
    assert len(set(plain)) < len(plain) / 2  # the tiny model loops
    out = mixtral_llm.generate(PROMPTS[2], SamplingParams(**GREEDY, repetition_penalty=5.0))[0].token_ids
    assert out != plain and len(set(out)) == len(out)
    assert out == penalised_greedy(mixtral_llm, PROMPTS[2], 12, 5.0)


def test_logit_bias_forces_a_token_and_bad_ids_are_refused(mixtral_llm):
    out = mixtral_llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=1.0, seed=3, logit_bias={77: 100}))
    assert out[0].token_ids == [77] * 5
    eng = mixtral_llm.engine
    with pytest.raises(MoeRtError, match="token id 100000"):
        eng.add_request(PROMPTS[0], SamplingParams(logit_bias={100000: 1}))
    assert not eng.requests and not eng.has_unfinished()


def test_seed_at_the_int64_edges_samples(mixtral_llm):
    for seed, n in [(SEED_MAX, 1), (SEED_MIN, 2)]:
        out = mixtral_llm.generate(PROMPTS[1], SamplingParams(max_tokens=3, seed=seed, n=n))[0]
        assert len(out.outputs) == n and all(o.finish_reason for o in out.outputs)


def run_to_end(eng) -> dict:
    """Step the engine until it is idle; {request id: final output} of every request that ended."""
    done = {}
    while eng.has_unfinished():
        done.update((o.request_id, o) for o in eng.step().finished)
    return done


def test_one_failing_request_ends_alone_and_the_batch_goes_on(mixtral_llm, caplog):
    eng = mixtral_llm.engine
    params = [SamplingParams(**GREEDY), SamplingParams(**GREEDY, n=2), SamplingParams(**GREEDY)]
    want = [o.token_ids for o in mixtral_llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]],
                                                      [params[0], params[1], params[2]])]
    free0 = eng.blocks.num_free
    rids = [eng.add_request(p, sp) for p, sp in zip([PROMPTS[0], PROMPTS[1], PROMPTS[3]], params)]

    def broken(ids):
        if len(ids) >= 3:
            raise ValueError("detokenizer broke")
        return ""

    eng.requests[rids[1]][1].detok.step = broken  # the second completion of the n=2 request
    errors, done = [], {}
    while eng.has_unfinished():
        res = eng.step()
        errors += [o for o in res.outputs if o.finish_reason == "error"]
        done.update((o.request_id, o) for o in res.finished)
    assert sorted((o.request_id, o.index) for o in errors) == [(rids[1], 0), (rids[1], 1)]
    assert all(o.error == "ValueError: detokenizer broke" for o in errors)
    assert eng.blocks.num_free == free0  # the failed request's KV came back
    outs = [done[r] for r in rids]
    assert [outs[0].token_ids, outs[2].token_ids] == [want[0], want[2]]
    assert [c.finish_reason for c in outs[1].outputs] == ["error", "error"]
    assert outs[1].error == "ValueError: detokenizer broke" and outs[0].error is None
    assert sum("request %s failed" in r.msg for r in caplog.records) == 1  # logged once, with its traceback


def test_a_guide_that_raises_fails_only_its_request(mixtral_llm):
    eng = mixtral_llm.engine
    want = mixtral_llm.generate(PROMPTS[3], SamplingParams(**GREEDY))[0].token_ids

    class Exploding(SetGuide):
        def allows(self, t):
            raise RuntimeError("guide exploded")

    bad = eng.add_request(PROMPTS[0], SamplingParams(**GREEDY))
    eng.requests[bad][0].guide = Exploding(set())
    good = eng.add_request(PROMPTS[3], SamplingParams(**GREEDY))
    done = run_to_end(eng)
    assert done[bad].outputs[0].error == "RuntimeError: guide exploded" and done[bad].failed
    assert done[good].token_ids == want and not done[good].failed


def test_guided_engine_request_stays_inside_the_guide_and_stops_at_eos(mixtral_llm):
    eng = mixtral_llm.engine
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=10, temperature=1.0, seed=1))
    guide = eng.requests[rid][0].guide = SetGuide({40, 41, 42}, complete_after=4, eos=eng.eos_ids)
    out = run_to_end(eng)[rid]
    assert out.token_ids[:4] == guide.seen[:4] and set(out.token_ids[:4]) <= {40, 41, 42}
    assert out.token_ids[4] in eng.eos_ids and out.finish_reason == "stop"


def test_json_object_mode_end_to_end(mixtral_llm):
    from moe_rt.engine.json_guide import START_STATE, feed

    params = [SamplingParams(max_tokens=40, temperature=0, response_format="json_object"),
              SamplingParams(max_tokens=40, temperature=1.0, seed=1, n=3, ignore_eos=True, response_format="json_object")]
    outs = [c for o in mixtral_llm.generate(["Hello world", "And the earth was"], params) for c in o.outputs]
    closed = [c for c in outs if c.finish_reason == "stop"]
    assert closed, "no output closed its object"
    for c in outs:
        assert c.finish_reason in ("stop", "length") and c.error is None
        assert feed(START_STATE, c.text.encode()) is not None, f"{c.text!r} is not a prefix of a JSON object"
    for c in closed:  # ended at EOS as soon as the object closed, even with ignore_eos
        assert isinstance(json.loads(c.text), dict) and c.token_ids[-1] in mixtral_llm.engine.eos_ids
