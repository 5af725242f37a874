#!/usr/bin/env python3
"""Send many kinds of bad, odd and hostile requests to a running moe-rt server, then check that it
still serves.

    python scripts/hostile_requests.py http://127.0.0.1:8000 [--model NAME] [--api-key KEY]
                                       [--max-body-bytes N] [--json]

Every endpoint gets its share: completions, chat, models, models/{id}, tokenize, detokenize,
version, health, metrics, moe/stats, unknown paths and wrong methods. Afterwards /health must be
200 and a plain greedy completion must return tokens.

Prints a table (kinds tried, responses by status class, 5xx, error events inside streams, statuses
other than a case expects, engine alive) and exits 1 if any request got a 5xx or a server_error
event, a case got a status it does not allow, a request got no response at all, or the engine no
longer serves. `--model` defaults to the first id of /v1/models; `--max-body-bytes` must match
the server's limit (default 4 MiB, as `moe-rt serve`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

import httpx

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
TIMEOUT = 120.0
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: object = None  # sent as json.dumps(body): NaN stays a NaN literal, lone surrogates become \ud800 escapes
    raw: bytes | None = None  # sent as is (wins over body)
    headers: dict = field(default_factory=dict)
    expect: tuple[int, ...] = ()  # statuses this case allows (empty: anything but a 5xx)


@dataclass
class Result:
    case: Case
    status: int | None  # None: no HTTP response (the connection failed)
    problem: str | None = None  # a transport error, or a server_error event inside a streamed 200


@dataclass
class Report:
    results: list[Result]
    alive: bool
    requests_sent: int  # every HTTP request made, the liveness checks included

    @property
    def server_errors(self) -> list[Result]:
        return [r for r in self.results if (r.status or 0) >= 500 or (r.status is not None and r.problem)]

    @property
    def unexpected(self) -> list[Result]:
        return [r for r in self.results if r.case.expect and r.status not in r.case.expect]

    @property
    def no_response(self) -> list[Result]:
        return [r for r in self.results if r.status is None]

    @property
    def ok(self) -> bool:
        return self.alive and not (self.server_errors or self.unexpected or self.no_response)


def _nest(depth: int, leaf="x", kind: str = "list") -> str:
    return ("[" * depth + json.dumps(leaf) + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


def cases(model: str, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: str | None = None) -> list[Case]:
    """The catalogue. Names are unique; each is one kind of request."""
    C = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    CH = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    comp, chat = "/v1/completions", "/v1/chat/completions"
    big = 10 ** 4000  # fits Python's int-from-string limit, far beyond any field's range
    huge_digits = b'{"model": "' + model.encode() + b'", "prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}"
    deep = min(50000, max_body_bytes // 2 - 100)  # far beyond any parser's recursion limit, within the body limit
    bad400 = (400,)
    ok = (200,)

    def c(name, _expect=(), **kw):  # a completion: the baseline body with some fields changed
        return Case(name, "POST", comp, {**C, **kw}, expect=_expect)

    out = [
        # -- completions: sane baselines ---------------------------------------------------------
        Case("completion: plain", "POST", comp, C, expect=ok),
        Case("completion: stream with usage", "POST", comp, {**C, "stream": True, "stream_options": {"include_usage": True}}, expect=ok),
        Case("completion: n=2 logprobs=3", "POST", comp, {**C, "n": 2, "logprobs": 3, "temperature": 1, "seed": 1}, expect=ok),
        # -- bodies that are not JSON objects -----------------------------------------------------
        Case("body: invalid JSON", "POST", comp, raw=b"{bad json", expect=bad400),
        Case("body: empty", "POST", comp, raw=b"", expect=bad400),
        Case("body: whitespace only", "POST", comp, raw=b"  \n ", expect=bad400),
        Case("body: not UTF-8", "POST", comp, raw=b"\xff\xfe{\x00}", expect=bad400),
        Case("body: UTF-8 encoded surrogate bytes", "POST", comp, raw=b'{"model": "m", "prompt": "\xed\xa0\x80"}', expect=bad400),
        Case("body: UTF-8 BOM", "POST", comp, raw=b"\xef\xbb\xbf" + json.dumps(C).encode(), expect=bad400),
        Case("body: JSON array", "POST", comp, [C], expect=bad400),
        Case("body: JSON string", "POST", comp, "prompt", expect=bad400),
        Case("body: JSON null", "POST", comp, raw=b"null", expect=bad400),
        Case("body: trailing garbage", "POST", comp, raw=json.dumps(C).encode() + b" }", expect=bad400),
        Case("content-type: text/plain with a JSON body", "POST", comp, C, headers={"content-type": "text/plain"}, expect=ok),
        Case("content-type: form-urlencoded", "POST", comp, raw=b"model=x&prompt=hi",
             headers={"content-type": "application/x-www-form-urlencoded"}, expect=bad400),
        # -- non-finite numbers -------------------------------------------------------------------
        c("NaN temperature", temperature=float("nan"), _expect=bad400),
        c("Infinity top_p", top_p=float("inf"), _expect=bad400),
        c("-Infinity logit_bias value", logit_bias={"1": float("-inf")}, _expect=bad400),
        c("NaN where an int belongs (max_tokens)", max_tokens=float("nan"), _expect=bad400),
        Case("top_p 1e999 (parses to inf)", "POST", comp, raw=json.dumps(C).encode()[:-1] + b', "top_p": 1e999}', expect=bad400),
        # -- huge integers ------------------------------------------------------------------------
        Case("int with 5000 digits", "POST", comp, raw=huge_digits, expect=bad400),
        c("max_tokens 10**4000", max_tokens=big, _expect=bad400),
        c("max_tokens 2**64", max_tokens=2**64, _expect=bad400),
        c("prompt token id 10**4000", prompt=[1, big], _expect=bad400),
        c("logprobs 10**20", logprobs=10**20, _expect=bad400),
        c("top_k 2**40", top_k=2**40, _expect=bad400),
        c("n 10**6", n=10**6, _expect=bad400),
        c("best_of 10**30", best_of=10**30, _expect=bad400),
        # -- seeds ---------------------------------------------------------------------------------
        c("seed 2**63", seed=2**63, _expect=bad400),
        c("seed -(2**63)-1", seed=-(2**63) - 1, _expect=bad400),
        c("seed 2**63-1 with n=2", seed=INT64_MAX, n=2, temperature=1, _expect=bad400),
        c("seed 2**63-1 with n=1", seed=INT64_MAX, temperature=1, _expect=ok),
        c("seed -(2**63) with n=2", seed=-(2**63), n=2, temperature=1, _expect=ok),
        c("seed true", seed=True, _expect=bad400),
        # -- sampling ranges -----------------------------------------------------------------------
        c("temperature 1e-50 (greedy)", temperature=1e-50, _expect=ok),
        c("temperature 5e-324 (denormal)", temperature=5e-324, _expect=ok),
        c("temperature 2.0000001", temperature=2.0000001, _expect=bad400),
        c("temperature 1e308", temperature=1e308, _expect=bad400),
        c("temperature -0.0", temperature=-0.0, _expect=ok),
        c("top_p 5e-324", top_p=5e-324, temperature=1, _expect=ok),
        c("top_p 0", top_p=0, _expect=bad400),
        c("min_p 1.5", min_p=1.5, _expect=bad400),
        c("min_p 1 with temperature 1", min_p=1, temperature=1, _expect=ok),
        c("presence_penalty 2.5", presence_penalty=2.5, _expect=bad400),
        c("frequency_penalty -2 presence 2", frequency_penalty=-2, presence_penalty=2, temperature=1, _expect=ok),
        c("repetition_penalty 0", repetition_penalty=0, _expect=bad400),
        c("repetition_penalty 1e-300", repetition_penalty=1e-300, _expect=bad400),
        c("repetition_penalty 100", repetition_penalty=100, temperature=1, _expect=ok),
        c("max_tokens 0", max_tokens=0, _expect=bad400),
        c("max_tokens beyond the context", max_tokens=10**9, _expect=bad400),
        # -- logit_bias ---------------------------------------------------------------------------
        c("logit_bias key not an int", logit_bias={"abc": 1}, _expect=bad400),
        c("logit_bias key outside the vocabulary", logit_bias={"99999999": 1}, _expect=bad400),
        c("logit_bias key negative", logit_bias={"-1": 1}, _expect=bad400),
        c("logit_bias key with 5000 digits", logit_bias={"9" * 5000: 1}, _expect=bad400),
        c("logit_bias key ' 1'", logit_bias={" 1": 1}, _expect=bad400),
        c("logit_bias bias 1e9", logit_bias={"1": 1e9}, _expect=bad400),
        c("logit_bias 5000 entries", logit_bias={str(i): 1 for i in range(5000)}, _expect=bad400),
        c("logit_bias +100 on token 1", logit_bias={"1": 100}, _expect=ok),
        # -- response_format ----------------------------------------------------------------------
        c("response_format json_schema", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, _expect=bad400),
        c("response_format unknown type", response_format={"type": "xml"}, _expect=bad400),
        c("response_format not an object", response_format="json_object", _expect=bad400),
        c("response_format json_object", response_format={"type": "json_object"}, max_tokens=8, _expect=ok),
        # -- nesting ------------------------------------------------------------------------------
        Case("prompt nested tens of thousands deep", "POST", comp, raw=b'{"model": "m", "prompt": ' + _nest(deep).encode() + b"}", expect=bad400),
        Case("objects nested thousands deep", "POST", comp, raw=b'{"model": "m", "x": ' + _nest(deep // 4, kind="dict").encode() + b"}", expect=bad400),
        Case("prompt nested 500 deep", "POST", comp, raw=b'{"model": "m", "prompt": ' + _nest(500).encode() + b"}", expect=bad400),
        # -- unicode ------------------------------------------------------------------------------
        c("lone high surrogate in prompt", prompt="a\ud800b", _expect=bad400),
        Case("lone low surrogate in model", "POST", comp, {**C, "model": "\udc00"}, expect=bad400),
        c("lone surrogate in stop", stop=["\ud83d"], _expect=bad400),
        c("lone surrogate in user", user="\udfff", _expect=bad400),
        Case("lone surrogate in a key", "POST", comp, {**C, "\ud800": 1}, expect=bad400),
        c("surrogate pair escape (emoji)", prompt="\ud83d\ude00 hi", _expect=ok),
        c("NUL characters in prompt", prompt="a\x00b\x00", _expect=ok),
        c("RTL and combining marks", prompt="\u202e\u0301\u0301abc", _expect=ok),
        # -- prompt shapes ------------------------------------------------------------------------
        c("prompt empty string", prompt=""),
        c("prompt list of empty strings", prompt=["", ""]),
        c("prompt empty list", prompt=[], _expect=bad400),
        c("prompt token id -1", prompt=[1, -1], _expect=bad400),
        c("prompt token id float", prompt=[1.0, 2.0], _expect=bad400),
        c("prompt token id bool", prompt=[True], _expect=bad400),
        c("prompt mixed types", prompt=[1, "a", [2]], _expect=bad400),
        c("65 prompts", prompt=["hi"] * 65, _expect=bad400),
        c("prompt a number", prompt=42, _expect=bad400),
        c("prompt whitespace", prompt="   ", _expect=ok),
        # -- other fields -------------------------------------------------------------------------
        c("stop: 5 strings", stop=["a", "b", "c", "d", "e"], _expect=bad400),
        c("stop: empty string", stop=[""], _expect=bad400),
        c("stop: long string", stop="z" * 2000, _expect=ok),
        c("stream: 'yes'", stream="yes", _expect=bad400),
        c("stream_options without stream", stream_options={"include_usage": True}, _expect=bad400),
        c("echo with logprobs", echo=True, logprobs=1, _expect=bad400),
        c("suffix", suffix="end", _expect=bad400),
        c("unknown field", frobnicate=1, _expect=bad400),
        c("model unknown", model="gpt-9", _expect=(404,)),
        c("model an int", model=7, _expect=bad400),
        Case("model missing", "POST", comp, {"prompt": "Hi"}, expect=bad400),
        c("stream with n=2, logprobs and a bad logit_bias", stream=True, n=2, logprobs=1, logit_bias={"x": 1}, _expect=bad400),
        c("stream n=3 seeded", stream=True, n=3, seed=5, temperature=1, _expect=ok),
        # -- bodies over the limit ----------------------------------------------------------------
        Case("body over the limit", "POST", comp, {**C, "prompt": "x" * (max_body_bytes + 10)}, expect=(413,)),
        Case("chunked body over the limit", "POST", comp, raw=None, headers={"x-hostile-chunked": str(max_body_bytes)}, expect=(413,)),
        # -- chat ---------------------------------------------------------------------------------
        Case("chat: plain", "POST", chat, CH, expect=ok),
        Case("chat: stream", "POST", chat, {**CH, "stream": True}, expect=ok),
        Case("chat: no messages", "POST", chat, {**CH, "messages": []}, expect=bad400),
        Case("chat: unknown role", "POST", chat, {**CH, "messages": [{"role": "wizard", "content": "x"}]}, expect=bad400),
        Case("chat: image part", "POST", chat, {**CH, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, expect=bad400),
        Case("chat: every role", "POST", chat, {**CH, "messages": [
            {"role": r, "content": "x"} for r in ("system", "developer", "user", "assistant", "tool", "user")]}),
        Case("chat: only an assistant message", "POST", chat, {**CH, "messages": [{"role": "assistant", "content": "x"}]}),
        Case("chat: content parts, one empty", "POST", chat, {**CH, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": ""}]}]}, expect=ok),
        Case("chat: content null", "POST", chat, {**CH, "messages": [{"role": "user", "content": None}]}),
        Case("chat: content a number", "POST", chat, {**CH, "messages": [{"role": "user", "content": 5}]}, expect=bad400),
        Case("chat: message not an object", "POST", chat, {**CH, "messages": ["hi"]}, expect=bad400),
        Case("chat: surrogate in content", "POST", chat, {**CH, "messages": [{"role": "user", "content": "\ud800"}]}, expect=bad400),
        Case("chat: surrogate in name", "POST", chat, {**CH, "messages": [{"role": "user", "content": "x", "name": "\udc00"}]}, expect=bad400),
        Case("chat: 3000 messages", "POST", chat, {**CH, "messages": [{"role": "user", "content": "hi"}] * 3000}),
        Case("chat: max_completion_tokens 10**30", "POST", chat, {**CH, "max_completion_tokens": 10**30}, expect=bad400),
        Case("chat: top_logprobs 21", "POST", chat, {**CH, "logprobs": True, "top_logprobs": 21}, expect=bad400),
        Case("chat: tools", "POST", chat, {**CH, "tools": []}, expect=bad400),
        Case("chat: NaN frequency_penalty", "POST", chat, {**CH, "frequency_penalty": float("nan")}, expect=bad400),
        Case("chat: json_object stream", "POST", chat, {**CH, "stream": True, "max_tokens": 8, "response_format": {"type": "json_object"}}, expect=ok),
        # -- models -------------------------------------------------------------------------------
        Case("models: list", "GET", "/v1/models", expect=ok),
        Case("models: the served id", "GET", f"/v1/models/{model}", expect=ok),
        Case("models: unknown id", "GET", "/v1/models/gpt-9", expect=(404,)),
        Case("models: id with slashes", "GET", "/v1/models/org/name/x", expect=(404,)),
        Case("models: percent-encoded NUL and bad UTF-8", "GET", "/v1/models/a%00b%ff", expect=(404,)),
        Case("models: POST", "POST", "/v1/models", C, expect=(405,)),
        Case("models: query string junk", "GET", "/v1/models?x=%ff&&=&y", expect=ok),
        # -- tokenize / detokenize ----------------------------------------------------------------
        Case("tokenize: prompt", "POST", "/tokenize", {"model": model, "prompt": "Hello"}, expect=ok),
        Case("tokenize: messages", "POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}, expect=ok),
        Case("tokenize: both prompt and messages", "POST", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, expect=bad400),
        Case("tokenize: neither", "POST", "/tokenize", {"model": model}, expect=bad400),
        Case("tokenize: prompt a list", "POST", "/tokenize", {"prompt": [1, 2]}, expect=bad400),
        Case("tokenize: surrogate", "POST", "/tokenize", {"prompt": "\ud800"}, expect=bad400),
        Case("tokenize: unknown model", "POST", "/tokenize", {"model": "gpt-9", "prompt": "a"}, expect=(404,)),
        Case("tokenize: GET", "GET", "/tokenize", expect=(405,)),
        Case("detokenize: ids", "POST", "/detokenize", {"tokens": [1, 2, 3]}, expect=ok),
        Case("detokenize: id outside the vocabulary", "POST", "/detokenize", {"tokens": [1, 99999999]}, expect=bad400),
        Case("detokenize: negative id", "POST", "/detokenize", {"tokens": [-5]}, expect=bad400),
        Case("detokenize: id 10**4000", "POST", "/detokenize", {"tokens": [big]}, expect=bad400),
        Case("detokenize: tokens a string", "POST", "/detokenize", {"tokens": "1 2 3"}, expect=bad400),
        Case("detokenize: empty list", "POST", "/detokenize", {"tokens": []}, expect=ok),
        # -- the rest -----------------------------------------------------------------------------
        Case("version", "GET", "/version", expect=ok),
        Case("version: POST", "POST", "/version", {}, expect=(405,)),
        Case("health", "GET", "/health", expect=ok),
        Case("health: HEAD", "HEAD", "/health", expect=ok),
        Case("health: DELETE", "DELETE", "/health", expect=(405,)),
        Case("metrics", "GET", "/metrics", expect=ok),
        Case("metrics: PUT", "PUT", "/metrics", raw=b"x", expect=(405,)),
        Case("moe/stats", "GET", "/v1/moe/stats", expect=ok),
        Case("moe/stats: POST", "POST", "/v1/moe/stats", {}, expect=(405,)),
        Case("unknown path", "GET", "/v2/whatever", expect=(404,)),
        Case("path traversal", "GET", "/v1/../../etc/passwd", expect=(404,)),
        Case("long path", "GET", "/" + "a" * 8000, expect=(404,)),
        Case("completions: GET", "GET", comp, expect=(405,)),
        Case("chat: OPTIONS", "OPTIONS", chat, expect=(405,)),
        Case("completions: PATCH", "PATCH", comp, C, expect=(405,)),
    ]
    wrong = {"authorization": "Bearer wrong-key"}
    keyed = (401,) if api_key is not None else ok
    out += [
        Case("auth: wrong bearer key", "POST", comp, C, headers=wrong, expect=keyed),
        Case("auth: key without Bearer", "GET", "/v1/models", headers={"authorization": api_key or "x"}, expect=keyed),
        Case("auth: non-ASCII key", "GET", "/v1/models", headers={"authorization": "Bearer \u00e9\u00e9".encode("latin-1")}, expect=keyed),
        Case("auth: empty header", "POST", "/tokenize", {"prompt": "a"}, headers={"authorization": ""}, expect=keyed),
    ]
    names = [k.name for k in out]
    assert len(names) == len(set(names)), "case names must be unique"
    return out


def _chunked(limit: int):
    piece = b"x" * 65536
    yield b'{"model": "m", "prompt": "'
    for _ in range(limit // len(piece) + 2):
        yield piece
    yield b'"}'


def _send(client: httpx.Client, case: Case, api_key: str | None) -> Result:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    headers.update(case.headers)
    content = case.raw
    if "x-hostile-chunked" in headers:
        content = _chunked(int(headers.pop("x-hostile-chunked")))
    elif content is None and case.body is not None:
        content = json.dumps(case.body).encode()
        headers.setdefault("content-type", "application/json")
    try:
        r = client.request(case.method, case.path, content=content, headers=headers)
    except httpx.HTTPError as e:
        return Result(case, None, f"{type(e).__name__}: {e}")
    problem = None
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"server_error"' in line:
                problem = f"error event in the stream: {line[6:200]}"
                break
    return Result(case, r.status_code, problem)


def engine_alive(client: httpx.Client, model: str, api_key: str | None) -> tuple[bool, int]:
    """(serves?, requests made): /health is 200 and a greedy completion returns tokens."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        if client.get("/health").status_code != 200:
            return False, 1
        r = client.post("/v1/completions", headers=headers,
                        json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, 2
    except httpx.HTTPError:
        return False, 2


def run(url: str, model: str | None = None, *, api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Report:
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        sent = 0
        if model is None:
            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            model = client.get("/v1/models", headers=headers).json()["data"][0]["id"]
            sent += 1
        results = [_send(client, case, api_key) for case in cases(model, max_body_bytes=max_body_bytes, api_key=api_key)]
        alive, n = engine_alive(client, model, api_key)
    return Report(results, alive, sent + len(results) + n)


def table(report: Report) -> str:
    classes = Counter("no response" if r.status is None else f"{r.status // 100}xx" for r in report.results)
    statuses = Counter(r.status for r in report.results if r.status is not None)
    rows = [
        ("kinds of request tried", str(len(report.results))),
        *[(f"responses {k}", str(v)) for k, v in sorted(classes.items())],
        ("statuses", ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))),
        ("5xx (or server_error events in a stream)", str(len(report.server_errors))),
        ("statuses a case does not allow", str(len(report.unexpected))),
        ("HTTP requests sent (with the liveness checks)", str(report.requests_sent)),
        ("engine alive afterwards", "yes" if report.alive else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    for r in report.server_errors + report.unexpected + report.no_response:
        lines.append(f"  ! {r.case.name}: status {r.status} (allowed {list(r.case.expect) or 'any but 5xx'}) {r.problem or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="the served model id (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="the server's body limit")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    report = run(args.url.rstrip("/"), args.model, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    if args.json:
        print(json.dumps({"kinds": len(report.results), "alive": report.alive, "requests_sent": report.requests_sent,
                          "statuses": dict(Counter(str(r.status) for r in report.results)),
                          "server_errors": [r.case.name for r in report.server_errors],
                          "unexpected": [[r.case.name, r.status] for r in report.unexpected]}))
    else:
        print(table(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
