"""Every error status in OpenAI's shape {"error": {"message", "type", "param", "code"}}:
400 (invalid JSON, a bad field named, the context length with both numbers), 404 (model,
route), 405, 413, 503 (queue full, with Retry-After). 401 and 429 are in test_auth.py."""
import threading
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID


def check_shape(r, status, param=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    return err


def post(server, path, body, **kw):
    return httpx.post(server.url(path), content=body, timeout=60, headers={"Content-Type": "application/json"}, **kw)


def test_invalid_json(server):
    err = check_shape(post(server, "/v1/chat/completions", b'{"model": "tiny-qwen2", "messages": ['), 400)
    assert "not valid JSON" in err["message"]
    check_shape(post(server, "/v1/chat/completions", b"[]"), 400)
    check_shape(post(server, "/v1/completions", b""), 400)


def test_invalid_utf8(server):
    body = b'{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'
    check_shape(post(server, "/v1/chat/completions", body), 400)


def test_fields_named(client):
    cases = [
        (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (dict(messages=[{"role": "user", "content": "x"}], temperature=5), "temperature"),
        (dict(messages=[{"role": "user", "content": "x"}], n=0), "n"),
        (dict(messages=[{"role": "user", "content": "x"}], top_p=2), "top_p"),
        (dict(messages=[{"role": "user", "content": "x"}], logit_bias={"999999": 1}), "logit_bias"),
        (dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), "max_tokens"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
         "messages[0].content[0]"),
        (dict(messages=[]), "messages"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, **kw)
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, (kw, e.value.body)
        assert e.value.body["type"] == "invalid_request_error"


def test_context_length(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, max_tokens=100000, messages=[{"role": "user", "content": "x"}])
    msg = e.value.body["message"]
    assert "maximum context length is 2048 tokens" in msg and "100000 in the completion" in msg
    assert e.value.body["code"] == "context_length_exceeded"
    long_prompt = "x = 1\n" * 3000
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=long_prompt, max_tokens=1)
    assert "2048" in e.value.body["message"]
    assert "resulted in" in e.value.body["message"]


def test_unknown_model_and_route(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    check_shape(httpx.get(server.url("/v1/nothing-here"), timeout=10), 404)
    check_shape(httpx.get(server.url("/v1/models/gpt-4o"), timeout=10), 404)


def test_method_not_allowed(server):
    r = httpx.get(server.url("/v1/chat/completions"), timeout=10)
    check_shape(r, 405)
    assert r.headers["allow"] == "POST"
    r = httpx.post(server.url("/v1/models"), json={}, timeout=10)
    check_shape(r, 405)
    assert r.headers["allow"] == "GET, HEAD"


def test_body_too_large(server):
    big = b'{"model": "tiny-qwen2", "prompt": "' + b"a" * (2 << 20) + b'"}'  # over the 1M limit
    try:
        r = post(server, "/v1/completions", big)
        check_shape(r, 413)
    except httpx.HTTPError:
        pass  # the server may close before reading the body; it must keep serving
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200


def test_queue_full_503(server_factory):
    # one sequence runs, one request may wait: the third gets 503
    s = server_factory("--max-seqs", "1", "--max-queue", "1", "--no-audit")
    try:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1500,
                "ignore_eos": True, "stream": True}
        started = threading.Event()
        stop = threading.Event()

        def long_request():
            with httpx.stream("POST", s.url("/v1/chat/completions"), json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    started.set()
                    if stop.is_set():
                        break

        waiting = {}

        def queued_request():
            waiting["r"] = httpx.post(s.url("/v1/completions"), timeout=120,
                                      json={"model": MODEL_ID, "prompt": "a", "max_tokens": 2})

        t = threading.Thread(target=long_request)
        t.start()
        assert started.wait(60)
        q = threading.Thread(target=queued_request)
        q.start()
        end = time.time() + 30
        while time.time() < end and s.metrics()[0].get("zse_queue_depth") != 1:
            time.sleep(0.02)
        assert s.metrics()[0]["zse_queue_depth"] == 1
        r = httpx.post(s.url("/v1/chat/completions"), timeout=60,
                       json={"model": MODEL_ID, "messages": [{"role": "user", "content": "y"}], "max_tokens": 2})
        err = check_shape(r, 503)
        assert int(r.headers["retry-after"]) >= 1
        assert err["type"] == "server_error"
        with pytest.raises(openai.InternalServerError) as e:
            s.client().chat.completions.create(model=MODEL_ID, max_tokens=2, messages=[{"role": "user", "content": "y"}])
        assert e.value.status_code == 503
        # the long request's client leaves: its sequence is cancelled and the waiting one runs
        stop.set()
        t.join(60)
        q.join(60)
        assert waiting["r"].status_code == 200
        assert httpx.post(s.url("/v1/completions"), timeout=60,
                          json={"model": MODEL_ID, "prompt": "a", "max_tokens": 2}).status_code == 200
    finally:
        rc, log = s.close()
        assert rc == 0, log[-3000:]
