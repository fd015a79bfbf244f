"""Prompt scoring over HTTP, as lm-eval-harness's `local-completions` model asks for it
(lm_eval itself needs torch, which cannot be installed lean here, so these tests send the
requests it sends and read the answers the way it does):

- loglikelihood(context, continuation): POST /v1/completions with the token ids of
  context + continuation, echo=true, logprobs=1, max_tokens=1, temperature=0; the answer is
  sum(token_logprobs[ctxlen:-1]) and is_greedy = every token's logprob is the max of its
  top_logprobs;
- loglikelihood_rolling(text): the same with the tokenizer's EOS as the one-token context.

Goldens are transformers' (tests/fixtures/tiny-qwen2/goldens.json: the next-token logits of
whole prompts and the argmax after every position), against an f32 conversion of the fixture.
"""
import json
import math

import httpx
import pytest

from conftest import ROOT, Server

GOLDENS = ROOT / "tests" / "fixtures" / "tiny-qwen2" / "goldens.json"
NAME = "tiny-qwen2-f32"


@pytest.fixture(scope="module")
def f32_server(zse_bin, f32_model_path):
    s = Server(zse_bin, f32_model_path, ("--max-seqs", "4"))
    yield s
    rc, log = s.close()
    assert rc == 0, log[-4000:]
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]


@pytest.fixture(scope="module")
def goldens():
    return json.loads(GOLDENS.read_text())["logits"]


def log_softmax(logits):
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    return [x - lse for x in logits]


def lm_eval_loglikelihood(server, requests):
    """lm_eval's local-completions: one batched request, parsed as its parse_logprobs does"""
    r = httpx.post(server.url("/v1/completions"), timeout=120, json={
        "model": NAME, "prompt": [ctx + cont for ctx, cont in requests], "temperature": 0, "max_tokens": 1,
        "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    out = []
    for choice, (ctx, cont) in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), requests):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx) + len(cont) + 1  # the prompt's tokens, then the generated one
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        tokens = lp["token_logprobs"][len(ctx):-1]
        tops = lp["top_logprobs"][len(ctx):-1]
        out.append((sum(tokens), all(t == max(top.values()) for t, top in zip(tokens, tops))))
    return out


def test_loglikelihood_matches_transformers(f32_server, goldens):
    reqs, want = [], []
    for g in goldens:
        lsm = log_softmax(g["last_logits"])
        best = max(range(len(lsm)), key=lsm.__getitem__)
        other = min(range(len(lsm)), key=lsm.__getitem__)
        reqs += [(g["ids"], [best]), (g["ids"], [other])]
        want += [(lsm[best], True), (lsm[other], False)]
    got = lm_eval_loglikelihood(f32_server, reqs)
    for (ll, greedy), (wll, wgreedy) in zip(got, want):
        assert ll == pytest.approx(wll, abs=2e-3)
        assert greedy == wgreedy


def test_every_prompt_position_matches_transformers(f32_server, goldens):
    """vLLM's prompt_logprobs: the rank-1 token after every position is transformers' argmax"""
    for g in goldens:
        r = httpx.post(f32_server.url("/v1/completions"), timeout=60, json={
            "model": NAME, "prompt": g["ids"], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}).json()
        plp = r["choices"][0]["prompt_logprobs"]
        assert len(plp) == len(g["ids"]) and plp[0] is None
        for i, entry in enumerate(plp[1:], start=1):
            assert str(g["ids"][i]) in entry  # the prompt's own token is always there, with its rank
            top = [int(k) for k, v in entry.items() if v["rank"] == 1]
            assert top == [g["argmax_per_position"][i - 1]]


def test_loglikelihood_rolling(f32_server, goldens):
    """lm_eval's rolling windows for a short text: the EOS as context, every token scored"""
    eos = httpx.get(f32_server.url("/tokenizer_info"), timeout=10).json()["eos_token"]
    eos_ids = httpx.post(f32_server.url("/tokenize"), json={"prompt": eos}, timeout=10).json()["tokens"]
    assert len(eos_ids) == 1
    ids = goldens[0]["ids"]
    (ll, _), = lm_eval_loglikelihood(f32_server, [(eos_ids, ids)])
    # the same prompt scored alone (max_tokens 0: nothing generated) adds up to the same
    r = httpx.post(f32_server.url("/v1/completions"), timeout=60, json={
        "model": NAME, "prompt": eos_ids + ids, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    lp = r["choices"][0]["logprobs"]["token_logprobs"]
    assert len(lp) == len(ids) + 1 and r["usage"]["completion_tokens"] == 0
    assert ll == pytest.approx(sum(lp[1:]), abs=1e-4)
    assert math.isfinite(ll) and ll < 0


def test_echo_logprobs_shape(f32_server):
    """OpenAI's legacy shape: prompt tokens first (the first null), offsets into the echoed text"""
    prompt = "def add(a, b):\n    return"
    r = httpx.post(f32_server.url("/v1/completions"), timeout=60, json={
        "model": NAME, "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0}).json()
    c = r["choices"][0]
    lp = c["logprobs"]
    n_prompt = r["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + r["usage"]["completion_tokens"]
    assert c["text"].startswith(prompt) and "".join(lp["tokens"]) == c["text"]
    assert lp["text_offset"][0] == 0
    assert [c["text"][o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    # streamed: the echo comes with the prompt's logprobs, then each token's
    chunks = []
    with httpx.stream("POST", f32_server.url("/v1/completions"), timeout=60, json={
            "model": NAME, "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0,
            "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(ch["text"] for ch in chunks) == c["text"]
    streamed = sum((ch["logprobs"]["token_logprobs"] for ch in chunks if ch["logprobs"]), [])
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)


def test_scoring_errors(f32_server):
    def post(body):
        return httpx.post(f32_server.url("/v1/completions"), json={"model": NAME, "prompt": "x", **body}, timeout=30)

    assert post({"max_tokens": -1}).status_code == 400
    assert post({"prompt_logprobs": 21}).status_code == 400
    r = post({"prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]
    r = post({"max_tokens": 0})  # nothing generated, nothing asked: an empty completion
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ""
    r = post({"max_tokens": 2, "min_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_chat_prompt_logprobs(f32_server):
    r = httpx.post(f32_server.url("/v1/chat/completions"), timeout=60, json={
        "model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0})
    body = r.json()
    assert r.status_code == 200, r.text
    plp = body["prompt_logprobs"]
    assert plp[0] is None and len(plp) == body["usage"]["prompt_tokens"]
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in plp[1:])


def test_completions_best_of(f32_server):
    """best_of: candidates drawn as n of them would be (choice i: seed+i), the n with the highest
    logprob per token answered, in candidate order"""
    body = {"model": NAME, "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 1.0, "seed": 11}
    all3 = httpx.post(f32_server.url("/v1/completions"), timeout=60, json={**body, "n": 3, "logprobs": 0}).json()
    means = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"]) for c in all3["choices"]]
    order = sorted(range(3), key=lambda i: (-means[i], i))
    for n in (1, 2):
        r = httpx.post(f32_server.url("/v1/completions"), timeout=60, json={**body, "n": n, "best_of": 3}).json()
        want = [all3["choices"][i]["text"] for i in sorted(order[:n])]
        assert [c["text"] for c in r["choices"]] == want and [c["index"] for c in r["choices"]] == list(range(n))
        assert r["choices"][0]["logprobs"] is None  # ranked by logprobs, shown only when asked
        assert r["usage"]["completion_tokens"] == all3["usage"]["completion_tokens"]  # every candidate ran
