"""Every JSON route refuses a field it does not know — top-level or inside an object the server
reads — with a 400 naming the field and the route, rather than dropping it; and the fields the
real clients send (the openai SDK's metadata fields, lm-eval-harness's payloads and remote
tokenizer, lorax-client's response_format) are taken. The other client suites (test_openai,
test_langchain, test_structured, test_tgi_clients, test_lora, test_scoring) are the proof
that each route's list holds everything those clients put in their requests."""
import json

import httpx
import openai
import pytest
from lorax import Client as LoraxClient

from conftest import MODEL_ID

MSGS = [{"role": "user", "content": "hi"}]


def refused(r, field, route):
    """a 400 whose message starts by naming the field and the route"""
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    msg = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert msg.startswith(f"unsupported field '{field}' for {route}; remove it"), msg
    if isinstance(body["error"], dict):
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == field
    else:
        assert body["error_type"] == "validation"
    return msg


OPENAI_CASES = [
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": MSGS, "best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": MSGS, "stream": True,
                              "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": MSGS,
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}, "examples": []}}]},
     "tools[0].function.examples"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": MSGS,
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "p", "schema": {}, "strcit": True}}},
     "response_format.json_schema.strcit"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi", "weight": 0}]},
     "messages[0].weight"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1, "skip_special_tokens": False},
     "skip_special_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1,
                         "response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ("/v1/embeddings", {"model": MODEL_ID, "input": "x", "truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": False, "return_tokens_as_ids": True}, "return_tokens_as_ids"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "id": "b1"}]}]},
     "messages[0].content[0].id"),
    ("/detokenize", {"tokens": [1, 2], "skip_special_tokens": True}, "skip_special_tokens"),
]


@pytest.mark.parametrize("route,body,field", OPENAI_CASES, ids=[f"{c[0]}:{c[2]}" for c in OPENAI_CASES])
def test_openai_routes_refuse_unknown_fields(server, route, body, field):
    refused(httpx.post(server.url(route), json=body, timeout=30), field, route)


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
def test_tgi_routes_refuse_unknown_fields(server, route):
    name = "/generate (and / and /generate_stream)"
    r = httpx.post(server.url(route), json={"inputs": "x", "parameters": {"max_new_tokens": 2}, "options": {}}, timeout=30)
    refused(r, "options", name)
    r = httpx.post(server.url(route), json={"inputs": "x", "parameters": {"max_new_tokens": 2, "penalty_alpha": 0.6}},
                   timeout=30)
    refused(r, "parameters.penalty_alpha", name)
    r = httpx.post(server.url(route), json={"inputs": "x", "parameters": {
        "max_new_tokens": 2, "grammar": {"type": "regex", "value": "a+", "flags": "i"}}}, timeout=30)
    refused(r, "parameters.grammar.flags", name)


def test_openai_sdk_refusal_names_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=1, extra_body={"foo": 1})
    assert "unsupported field 'foo' for /v1/chat/completions" in str(err.value)


def test_openai_keeping_fields(server, client):
    """store false and service_tier auto/default are what happens here; store true, metadata
    and the paid tiers are refused, not dropped"""
    r = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, store=False, service_tier="auto",
                                       user="fields-test")
    assert r.choices[0].message.content is not None
    for kw, field in (({"store": True}, "store"), ({"metadata": {"a": "b"}}, "metadata"),
                      ({"service_tier": "flex"}, "service_tier")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=1, **kw)
        assert err.value.body["param"] == field
    # OpenAI's own rule: stream_options only with stream
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=1,
                                       stream_options={"include_usage": True})
    assert err.value.body["param"] == "stream_options"


def test_nulls_are_not_given(server):
    """explicit nulls are absent fields, as OpenAI reads them (lorax-client and text-generation
    send every field, null when unset)"""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi", "name": None}], "max_tokens": 2,
            "temperature": None, "top_p": None, "n": None, "stop": None, "seed": None, "logit_bias": None,
            "logprobs": None, "top_logprobs": None, "stream": None, "stream_options": None, "tools": None,
            "tool_choice": None, "response_format": None, "user": None, "store": None, "metadata": None,
            "service_tier": None, "presence_penalty": None, "frequency_penalty": None, "functions": None}
    r = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1
    r = httpx.post(server.url("/v1/embeddings"), json={"model": MODEL_ID, "input": "x", "dimensions": None,
                                                       "encoding_format": None, "user": None}, timeout=60)
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"], list), r.text


def test_lm_eval_payloads(server):
    """lm-eval-harness's local-completions / local-chat-completions generate payloads and its
    remote tokenizer's requests, exactly as it builds them"""
    r = httpx.post(server.url("/v1/completions"), timeout=60, json={
        "prompt": ["Q: 1+1?\nA:"], "model": MODEL_ID, "max_tokens": 4, "temperature": 0, "stop": ["\n\n"],
        "seed": 1234})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    r = httpx.post(server.url("/v1/chat/completions"), timeout=60, json={
        "messages": MSGS, "model": MODEL_ID, "max_tokens": 4, "temperature": 0, "stop": ["<|endoftext|>"],
        "seed": 1234})
    assert r.status_code == 200, r.text
    r = httpx.post(server.url("/tokenize"), json={"prompt": "test", "add_special_tokens": False}, timeout=30)
    assert r.status_code == 200 and isinstance(r.json()["tokens"], list), r.text
    r = httpx.post(server.url("/detokenize"), json={"tokens": r.json()["tokens"]}, timeout=30)
    assert r.json()["prompt"] == "test"


def test_tokenize_prompt_refuses_chat_options(server):
    r = httpx.post(server.url("/tokenize"), json={"prompt": "x", "add_generation_prompt": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_generation_prompt", r.text


def test_lorax_response_format(server):
    """lorax-client's parameters.response_format holds the output to the schema"""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = LoraxClient(server.base, timeout=60).generate(
        "Answer:", max_new_tokens=60, response_format={"type": "json_object", "schema": schema})
    v = json.loads(out.generated_text)
    assert isinstance(v, dict) and list(v) == ["ok"] and isinstance(v["ok"], bool)
