"""The input rules, one by one: the body parser (server/json_body.py) and the schema ranges
(server/protocol.py) as units, then the rules that need the model (vocabulary, greedy by tiny
temperature) on the shared live server."""
import json

import httpx
import pytest
from pydantic import ValidationError

from server.errors import ApiError, validation_error
from server.json_body import load_json_object
from server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from srv_helpers import MODEL, assert_error

C = {"model": MODEL, "prompt": "Hello"}
INT64_MAX = 2**63 - 1


def parse_error(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as e:
        load_json_object(raw)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("raw, fragment", [
    (b"", "empty"),
    (b" \n", "empty"),
    (b"\xff\xfe", "not utf-8"),
    (b'{"a": "\xed\xa0\x80"}', "not utf-8"),  # a surrogate encoded as UTF-8 bytes
    (b"{bad", "not valid json"),
    (b'{"t": NaN}', "nan is not a json number"),
    (b'{"t": Infinity}', "infinity is not a json number"),
    (b'{"t": [-Infinity]}', "-infinity is not a json number"),
    (b"[" * 50000 + b"]" * 50000, "nested too deeply"),
    (b'{"a":' * 50000 + b"1" + b"}" * 50000, "nested too deeply"),
    (b'{"n": ' + b"7" * 5000 + b"}", "too many digits"),
    (b'{"p": "a\\ud800b"}', "invalid unicode"),
    (b'{"p": ["ok", {"k": "\\udfff"}]}', "invalid unicode"),
    (b'{"\\udc00": 1}', "invalid unicode"),
    (b"[1, 2]", "json object"),
    (b"null", "json object"),
])
def test_body_parser_rejects(raw, fragment):
    assert fragment in parse_error(raw).message.lower()


def test_body_parser_accepts_surrogate_pairs_and_escaped_backslashes():
    assert load_json_object(b'{"p": "\\ud83d\\ude00", "q": "\\\\ud800"}') == {"p": "\U0001F600", "q": "\\ud800"}


def invalid(model, body: dict) -> str:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return validation_error(e.value).message


@pytest.mark.parametrize("extra, fragment", [
    ({"temperature": float("nan")}, "finite number"),
    ({"top_p": float("inf")}, "finite number"),
    ({"temperature": 2.0000001}, "temperature"),
    ({"max_tokens": 2**31}, "max_tokens"),
    ({"max_tokens": 10**4000}, "max_tokens"),
    ({"top_k": 2**40}, "top_k"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": INT64_MAX, "n": 2}, "seed + n - 1"),
    ({"seed": True}, "seed"),
    ({"min_p": 1.01}, "min_p"),
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias: key 'abc' is not an integer token id"),
    ({"logit_bias": {" 1": 1}}, "key ' 1'"),
    ({"logit_bias": {"9" * 40: 1}}, "is not an integer token id"),
    ({"logit_bias": {"1": 100.5}}, "[-100, 100]"),
    ({"logit_bias": {"1": float("nan")}}, "finite number"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "at most 1024"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "'json_schema' is not supported"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "text", "json_schema": {}}}, "json_schema"),
    ({"best_of": 10**30}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
])
def test_completion_ranges(extra, fragment):
    assert fragment in invalid(CompletionRequest, {**C, **extra})


def test_the_edges_of_the_ranges_are_accepted():
    r = CompletionRequest.model_validate({
        **C, "seed": INT64_MAX - 1, "n": 2, "temperature": 2, "top_p": 1, "min_p": 1, "presence_penalty": -2,
        "frequency_penalty": 2, "repetition_penalty": 100, "logit_bias": {"0": -100, "5": 100}, "max_tokens": 2**31 - 1,
        "response_format": {"type": "json_object"}})
    assert r.logit_bias_ids == {0: -100, 5: 100}
    assert CompletionRequest.model_validate({**C, "seed": -(2**63), "n": 16}).seed == -(2**63)


def test_chat_and_tokenize_rules():
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    assert "max_completion_tokens" in invalid(ChatCompletionRequest, {**chat, "max_completion_tokens": 2**31})
    assert "finite number" in invalid(ChatCompletionRequest, {**chat, "frequency_penalty": float("-inf")})
    assert "exactly one of 'prompt' and 'messages'" in invalid(TokenizeRequest, {"prompt": "a", **chat})
    assert "exactly one of 'prompt' and 'messages'" in invalid(TokenizeRequest, {"model": MODEL})


# -- on the live server ----------------------------------------------------------------------------
def post_raw(srv, raw: bytes, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("raw, fragment", [
    (b'{"model": "tiny-mixtral", "prompt": "Hi", "temperature": NaN}', "nan"),
    (b'{"model": "tiny-mixtral", "prompt": "a\\ud800"}', "invalid unicode"),
    (b'{"model": "\\udc00", "prompt": "a"}', "invalid unicode"),
    (b'{"model": "tiny-mixtral", "prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}", "nested too deeply"),
    (b'{"model": "tiny-mixtral", "prompt": "Hi", "seed": ' + b"1" * 4400 + b"}", "too many digits"),
])
def test_hostile_bodies_are_400_on_every_body_route(srv, raw, fragment):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert_error(post_raw(srv, raw, path), 400, fragment)


def test_logit_bias_keys_outside_the_vocabulary_are_400_naming_the_key(srv):
    e = assert_error(srv.post("/v1/completions", {**C, "logit_bias": {"3": 1, "320": 5}}), 400, "key '320'", "[0, 320)")
    assert e["param"] == "logit_bias"
    assert_error(srv.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                   "logit_bias": {"-1": 5}, "stream": True}), 400, "key '-1'")


def test_logit_bias_steers_the_output(srv):
    r = srv.post("/v1/completions", {**C, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 0,
                                      "logit_bias": {"7": 100}})
    assert r.status_code == 200, r.text
    seven = srv.post("/detokenize", {"tokens": [7]}).json()["prompt"]
    assert r.json()["choices"][0]["logprobs"]["tokens"] == [seven] * 4


def test_a_tiny_temperature_is_greedy(srv):
    greedy = srv.post("/v1/completions", {**C, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
    tiny = srv.post("/v1/completions", {**C, "max_tokens": 8, "temperature": 1e-50, "ignore_eos": True}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_the_largest_seed_works_alone_and_is_400_with_n2(srv):
    body = {**C, "max_tokens": 3, "temperature": 1, "seed": INT64_MAX}
    assert srv.post("/v1/completions", body).status_code == 200
    assert_error(srv.post("/v1/completions", {**body, "n": 2}), 400, "seed + n - 1")


def test_new_sampling_fields_are_served(srv):
    body = {**C, "max_tokens": 4, "temperature": 1, "seed": 3, "min_p": 0.1, "repetition_penalty": 1.3,
            "presence_penalty": 1.5, "frequency_penalty": -0.5}
    a, b = srv.post("/v1/completions", body), srv.post("/v1/completions", body)
    assert a.status_code == 200, a.text
    assert a.json()["choices"] == b.json()["choices"]  # seeded: the same text twice


def test_json_schema_response_format_is_refused_clearly(srv):
    e = assert_error(srv.post("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
        400, "json_schema' is not supported")
    assert e["type"] == "invalid_request_error"


def test_json_object_response_format_is_accepted(srv):
    r = srv.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 6, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text


def test_any_content_type_is_read_as_json(srv):
    r = httpx.post(srv.url + "/v1/completions", content=json.dumps({**C, "max_tokens": 1}),
                   headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 200, r.text
