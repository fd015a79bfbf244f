"""TGI/LoRAX: /generate and /generate_stream."""
import json

import httpx

from conftest import MODEL_ID


def test_generate_matches_completions(server, client):
    r = httpx.post(server.url("/generate"), timeout=60,
                   json={"inputs": "def add(a, b):", "parameters": {"max_new_tokens": 10, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    want = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert body["generated_text"] == want.choices[0].text  # TGI is greedy unless asked to sample
    d = body["details"]
    assert d["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert d["generated_tokens"] == len(d["tokens"]) or d["finish_reason"] == "eos_token"
    assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    assert all(t["logprob"] <= 0 and isinstance(t["id"], int) for t in d["tokens"])
    plain = httpx.post(server.url("/generate"), timeout=60,
                       json={"inputs": "def add(a, b):", "parameters": {"max_new_tokens": 10}}).json()
    assert plain == {"generated_text": body["generated_text"]}
    full = httpx.post(server.url("/generate"), timeout=60,
                      json={"inputs": "def add(a, b):", "parameters": {"max_new_tokens": 10,
                                                                       "return_full_text": True}}).json()
    assert full == {"generated_text": "def add(a, b):" + body["generated_text"]}


def test_generate_stream(server):
    want = httpx.post(server.url("/generate"), timeout=60,
                      json={"inputs": "import os", "parameters": {"max_new_tokens": 8}}).json()["generated_text"]
    events = []
    with httpx.stream("POST", server.url("/generate_stream"), timeout=60,
                      json={"inputs": "import os", "parameters": {"max_new_tokens": 8, "details": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events and all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == want
    assert "".join(e["token"]["text"] for e in events if e["token"] and not e["token"]["special"]) == want
    assert events[-1]["details"]["finish_reason"] in ("length", "eos_token", "stop_sequence")


def test_generate_parameters(server):
    def gen(params):
        return httpx.post(server.url("/generate"), timeout=60, json={"inputs": "def add(a, b):", "parameters": params})

    a = gen({"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.9,
             "repetition_penalty": 1.2, "seed": 5}).json()["generated_text"]
    b = gen({"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.9,
             "repetition_penalty": 1.2, "seed": 5}).json()["generated_text"]
    assert a == b
    full = gen({"max_new_tokens": 20}).json()["generated_text"]
    k = next(i for i in range(2, len(full) - 1) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip())
    stopped = gen({"max_new_tokens": 20, "stop": [full[k:k + 2]], "details": True}).json()
    assert stopped["generated_text"] == full[:k]
    assert stopped["details"]["finish_reason"] == "stop_sequence"


def test_generate_errors(server):
    r = httpx.post(server.url("/generate"), timeout=60,
                   json={"inputs": "x", "parameters": {"adapter_id": "my-lora-adapter"}})
    assert r.status_code == 404
    assert "my-lora-adapter" in r.json()["error"] and "not loaded" in r.json()["error"]
    ok = httpx.post(server.url("/generate"), timeout=60,
                    json={"inputs": "x", "parameters": {"adapter_id": MODEL_ID, "max_new_tokens": 2}})
    assert ok.status_code == 200
    for params in ({"temperature": 0}, {"top_p": 1.0}, {"max_new_tokens": 0}, {"watermark": True}):
        r = httpx.post(server.url("/generate"), timeout=60, json={"inputs": "x", "parameters": params})
        assert r.status_code == 400 and r.json()["error_type"] == "validation", (params, r.text)
    r = httpx.post(server.url("/generate"), timeout=60, json={"parameters": {}})
    assert r.status_code == 400 and "inputs" in r.json()["error"]
