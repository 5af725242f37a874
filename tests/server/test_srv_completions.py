"""/v1/completions and /v1/chat/completions against a live server and the offline LLM API."""
import pytest

from moe_rt import SamplingParams

from srv_helpers import MODEL, sse_events

PROMPT = "In the beginning God created"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]


def complete(srv, **body):
    r = srv.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_completion_matches_offline_generate(srv, mixtral_llm):
    out = complete(srv, max_tokens=12)
    ref = mixtral_llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0]
    assert out["object"] == "text_completion" and out["model"] == MODEL
    (choice,) = out["choices"]
    assert choice["index"] == 0
    assert choice["text"] == ref.text
    assert choice["finish_reason"] == ref.finish_reason
    n_prompt = len(mixtral_llm.tokenizer.encode(PROMPT))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(ref.token_ids),
                            "total_tokens": n_prompt + len(ref.token_ids)}


def test_ignore_eos_runs_to_max_tokens(srv):
    out = complete(srv, max_tokens=9, ignore_eos=True)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 9


def test_token_id_prompt_equals_text_prompt(srv, mixtral_llm):
    ids = mixtral_llm.tokenizer.encode(PROMPT)
    assert complete(srv, prompt=ids, max_tokens=8)["choices"][0]["text"] == complete(srv, max_tokens=8)["choices"][0]["text"]


def test_list_of_prompts_gives_one_choice_each(srv):
    prompts = [PROMPT, "Hello world", "And God said"]
    out = complete(srv, prompt=prompts, max_tokens=6, ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for p, c in zip(prompts, out["choices"]):
        assert c["text"] == complete(srv, prompt=p, max_tokens=6, ignore_eos=True)["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == 18
    single = [complete(srv, prompt=p, max_tokens=1)["usage"]["prompt_tokens"] for p in prompts]
    assert out["usage"]["prompt_tokens"] == sum(single)


def test_list_of_token_id_lists(srv):
    out = complete(srv, prompt=[[1, 50, 60], [1, 70]], max_tokens=3)
    assert len(out["choices"]) == 2 and out["usage"]["prompt_tokens"] == 5


def test_n2_counts_prompt_once_and_every_choice(srv):
    out = complete(srv, prompt=["Hello", "And God said"], n=2, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    one = complete(srv, prompt="Hello", max_tokens=1)["usage"]["prompt_tokens"]
    two = complete(srv, prompt="And God said", max_tokens=1)["usage"]["prompt_tokens"]
    assert out["usage"] == {"prompt_tokens": one + two, "completion_tokens": 20, "total_tokens": one + two + 20}


def test_same_seed_same_text(srv):
    a = complete(srv, temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    b = complete(srv, temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_echo_prefixes_the_prompt(srv):
    plain = complete(srv, max_tokens=5)["choices"][0]["text"]
    assert complete(srv, max_tokens=5, echo=True)["choices"][0]["text"] == PROMPT + plain


def test_logprobs(srv):
    out = complete(srv, max_tokens=6, logprobs=3, ignore_eos=True)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
    # (top_logprobs is keyed by token text, so byte pieces that decode alike share a key, as in OpenAI)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_stop_string_cuts_the_text(srv):
    full = complete(srv, max_tokens=16, ignore_eos=True)["choices"][0]["text"]
    if len(full) < 4:
        pytest.skip(f"the random model produced too little text: {full!r}")
    stop = full[2:4]
    out = complete(srv, max_tokens=16, ignore_eos=True, stop=[stop])["choices"][0]
    assert out["text"] == full[: full.find(stop)]
    assert out["finish_reason"] == "stop"


def test_chat_matches_offline_chat(srv, mixtral_llm):
    r = srv.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 10})
    assert r.status_code == 200, r.text
    out = r.json()
    ref = mixtral_llm.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0))
    assert out["object"] == "chat.completion"
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == ref.finish_reason
    assert out["usage"]["prompt_tokens"] == len(mixtral_llm.tokenizer.encode_chat(MESSAGES))
    assert out["usage"]["completion_tokens"] == len(ref.token_ids)


def test_chat_max_completion_tokens_n_and_logprobs(srv):
    r = srv.post("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 4, "n": 2, "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True,
    })
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 8
    for c in out["choices"]:
        content = c["logprobs"]["content"]
        assert len(content) == 4 and all(len(t["top_logprobs"]) == 2 for t in content)
        assert all(t["bytes"] == list(t["token"].encode()) for t in content)
        # greedy: the chosen token is the most likely alternative
        assert all(abs(t["top_logprobs"][0]["logprob"] - t["logprob"]) < 1e-5 for t in content)
    assert out["choices"][0]["message"] == out["choices"][1]["message"]


def stream_lines(srv, path, body):
    import httpx

    with httpx.stream("POST", srv.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def test_chat_stream_deltas_concatenate_to_the_full_text(srv):
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    full = srv.post("/v1/chat/completions", body).json()
    events = stream_lines(srv, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]


def test_completion_stream_n2_per_choice_text(srv):
    body = {"model": MODEL, "prompt": PROMPT, "n": 2, "seed": 11, "temperature": 0.8, "max_tokens": 8}
    full = srv.post("/v1/completions", body).json()
    events = stream_lines(srv, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    texts, reasons = {0: "", 1: ""}, {}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] += c["text"]
        if c["finish_reason"]:
            reasons[c["index"]] = c["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in full["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in full["choices"]}
