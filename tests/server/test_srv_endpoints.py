"""GET /v1/models/{id}, /tokenize, /detokenize, /version, the OpenAPI document and /docs, and
their counts in /metrics, on the shared live server."""
import importlib.metadata

import pytest

from server.app import build_app
from server.async_engine import AsyncEngine
from srv_helpers import MODEL, assert_error

ERROR_REF = "#/components/schemas/ErrorResponse"


def test_model_by_id(srv):
    card = srv.get(f"/v1/models/{MODEL}").json()
    assert card == srv.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 256
    for unknown in ("gpt-9", "org/name", "a%00b"):
        e = assert_error(srv.get(f"/v1/models/{unknown}"), 404, "does not exist")
        assert e["code"] == "model_not_found"


def test_tokenize_a_prompt_and_messages(srv):
    tok = srv.engine.engine.tokenizer
    r = srv.post("/tokenize", {"model": MODEL, "prompt": "In the beginning"}).json()
    assert r == {"tokens": tok.encode("In the beginning"), "count": len(r["tokens"]), "max_model_len": 256}
    plain = srv.post("/tokenize", {"prompt": "In the beginning", "add_special_tokens": False}).json()["tokens"]
    assert plain == tok.encode("In the beginning", add_special_tokens=False) and len(plain) < len(r["tokens"])
    messages = [{"role": "user", "content": "Hello"}]
    chat = srv.post("/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == tok.encode_chat(messages) and chat["count"] == len(chat["tokens"])
    no_prompt = srv.post("/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == tok.encode_chat(messages, add_generation_prompt=False)


def test_tokenize_errors(srv):
    assert_error(srv.post("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400, "exactly one")
    assert_error(srv.post("/tokenize", {}), 400, "exactly one")
    assert_error(srv.post("/tokenize", {"prompt": ["a"]}), 400, "prompt")
    assert_error(srv.post("/tokenize", {"prompt": "a", "frob": 1}), 400, "unknown field 'frob'")
    assert assert_error(srv.post("/tokenize", {"model": "gpt-9", "prompt": "a"}), 404)["code"] == "model_not_found"
    assert_error(srv.get("/tokenize"), 405)


def test_detokenize_round_trips_tokenize(srv):
    ids = srv.post("/tokenize", {"prompt": "In the beginning"}).json()["tokens"]
    text = srv.post("/detokenize", {"model": MODEL, "tokens": ids}).json()["prompt"]
    assert text == srv.engine.engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert "In the beginning" in text
    assert srv.post("/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("tokens, fragment", [([1, 320], "tokens[1] = 320"), ([-1], "tokens[0] = -1"),
                                              ([10**30], "is not a token id in [0, 320)")])
def test_detokenize_ids_outside_the_vocabulary_are_400(srv, tokens, fragment):
    assert assert_error(srv.post("/detokenize", {"tokens": tokens}), 400, fragment)["param"] == "tokens"


def test_version(srv):
    assert srv.get("/version").json() == {"version": importlib.metadata.version("moe-rt")}


def test_new_endpoints_are_counted_by_route(srv):
    srv.get("/version")
    srv.get("/v1/models/gpt-9")
    srv.post("/detokenize", {"tokens": [-1]})
    srv.get("/no/such/route")
    text = srv.get("/metrics").text
    for label in ('endpoint="/version",status="200"', 'endpoint="/v1/models/{model_id}",status="404"',
                  'endpoint="/detokenize",status="400"', 'endpoint="other",status="404"'):
        assert f"moe_rt_requests_total{{{label}}}" in text, label


def test_openapi_document_describes_the_real_models(srv):
    doc = srv.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and doc["info"]["version"] == importlib.metadata.version("moe-rt")
    schemas = doc["components"]["schemas"]
    bodies = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
              "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (path, method)  # bad input is a 400 here
            if method == "post":
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref == f"#/components/schemas/{bodies[path]}", path
    assert set(bodies) <= set(doc["paths"])
    for path in ("/v1/models/{model_id}", "/version", "/health", "/metrics", "/v1/moe/stats"):
        assert "get" in doc["paths"][path], path
    # every $ref resolves, and the request schemas carry the validation ranges
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs <= set(schemas), refs - set(schemas)
    temperature = schemas["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert temperature["minimum"] == 0 and temperature["maximum"] == 2
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert completions["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionResponse")
    assert "text/event-stream" in completions["200"]["content"]
    for status in ("400", "401", "404", "413", "429", "500", "503"):
        assert completions[status]["content"]["application/json"]["schema"]["$ref"] == ERROR_REF, status
    assert doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]["404"]["content"]["application/json"]["schema"]["$ref"] == ERROR_REF


def test_docs_page_is_served(srv):
    r = srv.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower() and "/openapi.json" in r.text


def test_docs_can_be_turned_off():
    app = build_app(AsyncEngine(lambda: None), model_name=MODEL, docs=False)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert "/v1/completions" in paths and not {"/openapi.json", "/docs"} & paths
