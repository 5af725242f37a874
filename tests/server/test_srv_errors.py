"""Bad input gets an exact 4xx and an OpenAI-style error body naming the problem; never a 500."""
import httpx
import pytest

from srv_helpers import MODEL, assert_error

C = {"model": MODEL, "prompt": "Hello"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("body, fragment", [
    ({**C, "max_tokens": 0}, "max_tokens"),
    ({**C, "max_tokens": -3}, "max_tokens"),
    ({**C, "max_tokens": "5"}, "max_tokens"),
    ({**C, "max_tokens": 1000}, "maximum context length is 256"),
    ({**C, "temperature": -0.5}, "temperature"),
    ({**C, "temperature": "hot"}, "temperature"),
    ({**C, "top_p": 0}, "top_p"),
    ({**C, "top_p": 1.5}, "top_p"),
    ({**C, "n": 0}, "n"),
    ({**C, "logprobs": 50}, "logprobs"),
    ({**C, "stream": "yes"}, "stream"),
    ({**C, "stop": ["a", ""]}, "stop"),
    ({**C, "stop": 5}, "stop must be"),
    ({**C, "frobnicate": 1}, "unknown field 'frobnicate'"),
    ({**C, "frequency_penalty": 2.5}, "frequency_penalty"),
    ({**C, "echo": True, "logprobs": 1}, "echo together with logprobs"),
    ({**C, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**C, "prompt": [1] * 300}, "maximum context length"),
    ({**C, "prompt": [1, 99999]}, "token ids must be integers"),
    ({**C, "prompt": [1, "a"]}, "prompt must be"),
    ({**C, "prompt": []}, "prompt must not be empty"),
    ({**C, "prompt": [[]]}, "the prompt is empty"),
    ({"prompt": "Hello"}, "model"),
])
def test_bad_completion_request_is_400(srv, body, fragment):
    assert_error(srv.post("/v1/completions", body), 400, fragment)


@pytest.mark.parametrize("body, fragment", [
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": [{"content": "Hi"}]}, "role"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]}, "role"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "content must be"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs requires logprobs"),
    ({**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}, "maximum context length"),
    ({**CHAT, "tools": []}, "unknown field 'tools'"),
])
def test_bad_chat_request_is_400(srv, body, fragment):
    assert_error(srv.post("/v1/chat/completions", body), 400, fragment)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_malformed_body_is_400(srv, raw):
    r = httpx.post(srv.url + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert_error(r, 400, "json")


def test_unknown_model_is_404(srv):
    e = assert_error(srv.post("/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 404, "gpt-9")
    assert e["code"] == "model_not_found" and e["param"] == "model"


def test_body_over_the_limit_is_413(srv):
    e = assert_error(srv.post("/v1/completions", {**C, "prompt": "x" * 70000}), 413, "exceeds 65536 bytes")
    assert e["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(srv):
    def chunks():
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(10):
            yield b"x" * 10000
        yield b'"}'

    assert_error(httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=60), 413, "exceeds")


def test_unknown_route_and_wrong_method_have_error_bodies(srv):
    assert_error(srv.get("/v1/nope"), 404)
    assert_error(srv.get("/v1/completions"), 405)


def test_errors_are_counted_by_status(srv):
    srv.post("/v1/completions", {**C, "max_tokens": 0})
    text = srv.get("/metrics").text
    assert 'moe_rt_requests_total{endpoint="/v1/completions",status="400"}' in text
