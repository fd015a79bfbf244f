"""TGI parity with the official clients, unmodified: `text-generation` (Client) and
huggingface_hub's InferenceClient against zse serve — details with prefill
(decoder_input_details), top_tokens (top_n_tokens), real logprobs on streamed tokens with or
without details, best_of, truncate, and GET /info."""
import math

import httpx
import pytest
from huggingface_hub import InferenceClient
from lorax import Client as LoraxClient
from text_generation import Client
from text_generation.errors import ValidationError

from conftest import MODEL_ID

PROMPT = "def fibonacci(n):\n"


@pytest.fixture(scope="module")
def tgi(server):
    return Client(server.base, timeout=60)


def test_generate_details_prefill_and_top_tokens(server, tgi, client):
    r = tgi.generate(PROMPT, max_new_tokens=6, decoder_input_details=True, top_n_tokens=3)
    d = r.details
    prompt_ids = server_tokens(server, PROMPT)
    assert [t.id for t in d.prefill] == prompt_ids
    assert d.prefill[0].logprob is None  # nothing comes before the first token
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.prefill[1:])
    # the same numbers as OpenAI's legacy scoring (echo + logprobs) of the same prompt
    score = client.completions.create(model=MODEL_ID, prompt=prompt_ids, max_tokens=0, echo=True, logprobs=1)
    want = score.choices[0].logprobs.token_logprobs
    assert want[0] is None
    assert [t.logprob for t in d.prefill[1:]] == pytest.approx(want[1:], abs=1e-5)
    # greedy: each token is the first of its alternatives, which come most likely first
    assert len(d.top_tokens) == d.generated_tokens == len(d.tokens)
    for tok, top in zip(d.tokens, d.top_tokens):
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].id == tok.id and top[0].logprob == pytest.approx(tok.logprob)
    assert "".join(t.text for t in d.tokens) == r.generated_text
    # without decoder_input_details the prefill is empty, without top_n_tokens no top_tokens
    plain = tgi.generate(PROMPT, max_new_tokens=6)
    assert plain.details.prefill == [] and plain.details.top_tokens is None
    assert plain.generated_text == r.generated_text


def server_tokens(server, text):
    r = httpx.post(server.url("/tokenize"), json={"prompt": text}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_stream_carries_real_logprobs(tgi):
    whole = tgi.generate(PROMPT, max_new_tokens=6, top_n_tokens=2).details
    streamed = list(tgi.generate_stream(PROMPT, max_new_tokens=6, top_n_tokens=2))
    assert [s.token.id for s in streamed] == [t.id for t in whole.tokens]
    assert [s.token.logprob for s in streamed] == pytest.approx([t.logprob for t in whole.tokens], abs=1e-5)
    assert all(s.token.logprob < 0 for s in streamed)  # real numbers, not 0.0
    assert [[t.id for t in s.top_tokens] for s in streamed] == [[t.id for t in top] for top in whole.top_tokens]
    assert streamed[-1].details.generated_tokens == whole.generated_tokens


def test_best_of(server, tgi):
    r = tgi.generate(PROMPT, max_new_tokens=8, best_of=3, do_sample=True, temperature=1.0)
    d = r.details
    assert len(d.best_of_sequences) == 2
    best = sum(t.logprob for t in d.tokens)
    for other in d.best_of_sequences:
        assert sum(t.logprob for t in other.tokens) <= best + 1e-4
        assert other.generated_text == "".join(t.text for t in other.tokens)
    assert len({d.seed, *(o.seed for o in d.best_of_sequences)}) == 3  # each candidate drew its own
    with pytest.raises(ValidationError):  # the client checks it first; the server too:
        tgi.generate(PROMPT, best_of=2)
    for params, field in (({"best_of": 2}, "best_of"), ({"best_of": 2, "do_sample": True, "seed": 1}, "seed")):
        bad = httpx.post(server.url("/generate"), json={"inputs": PROMPT, "parameters": params}, timeout=30)
        assert bad.status_code == 400 and field in bad.json()["error"], bad.text
    bad = httpx.post(server.url("/generate_stream"), timeout=30,
                     json={"inputs": PROMPT, "parameters": {"best_of": 2, "do_sample": True}})
    assert bad.status_code == 400 and "stream" in bad.json()["error"]
    bad = httpx.post(server.url("/"), timeout=30,
                     json={"inputs": PROMPT, "stream": True, "parameters": {"decoder_input_details": True}})
    assert bad.status_code == 400 and "decoder_input_details" in bad.json()["error"]


def test_truncate_and_typical_p(server, tgi):
    long = PROMPT * 4
    ids = server_tokens(server, long)
    r = tgi.generate(long, max_new_tokens=3, truncate=5, decoder_input_details=True)
    assert [t.id for t in r.details.prefill] == ids[-5:]
    same = tgi.generate(httpx.post(server.url("/detokenize"), json={"tokens": ids[-5:]}).json()["prompt"],
                        max_new_tokens=3)
    assert same.generated_text == r.generated_text
    bad = httpx.post(server.url("/generate"), json={"inputs": PROMPT, "parameters": {"typical_p": 0.5}}, timeout=30)
    assert bad.status_code == 400 and "typical_p" in bad.json()["error"]


def test_huggingface_hub_inference_client(server):
    hub = InferenceClient(model=server.base, timeout=60)
    out = hub.text_generation(PROMPT, max_new_tokens=5, details=True, decoder_input_details=True, top_n_tokens=2)
    assert out.details.prefill[0].logprob is None and len(out.details.prefill) > 1
    assert len(out.details.tokens) == out.details.generated_tokens == len(out.details.top_tokens)
    assert out.generated_text == "".join(t.text for t in out.details.tokens)
    text = hub.text_generation(PROMPT, max_new_tokens=5)
    assert text == out.generated_text
    chunks = list(hub.text_generation(PROMPT, max_new_tokens=5, stream=True, details=True))
    assert "".join(c.token.text for c in chunks) == out.generated_text
    assert [c.token.logprob for c in chunks] == pytest.approx([t.logprob for t in out.details.tokens], abs=1e-5)
    assert chunks[-1].details.finish_reason == out.details.finish_reason
    words = list(hub.text_generation(PROMPT, max_new_tokens=5, stream=True))
    assert "".join(words) == out.generated_text
    info = InferenceClient(model=server.base, provider="hf-inference", timeout=60).get_endpoint_info()
    assert info["model_id"] == MODEL_ID and info["router"] == "zse"
    assert info["max_total_tokens"] == info["max_input_tokens"] + 1
    assert math.isfinite(info["max_batch_size"])


def test_info_limits_hold(server):
    info = httpx.get(server.url("/info"), timeout=10).json()
    models = httpx.get(server.url("/v1/models"), timeout=10).json()["data"]
    assert info["max_total_tokens"] == models[0]["max_model_len"]
    assert info["max_input_length"] == info["max_input_tokens"]
    m, _ = server.metrics()  # the KV cache's tokens: its blocks of 16
    assert info["max_batch_total_tokens"] == 16 * (m["zse_kv_blocks_used"] + m["zse_kv_blocks_free"])
    # max_best_of and max_stop_sequences are the server's real limits
    over = httpx.post(server.url("/generate"), timeout=30, json={"inputs": PROMPT, "parameters": {
        "best_of": info["max_best_of"] + 1, "do_sample": True}})
    assert over.status_code == 400
    over = httpx.post(server.url("/generate"), timeout=30, json={"inputs": PROMPT, "parameters": {
        "stop": [str(i) for i in range(info["max_stop_sequences"] + 1)]}})
    assert over.status_code == 400


def test_lorax_client_parity(server, tgi):
    """lorax-client: prefill, best_of, return_k_alternatives (ignore_eos_token maps to the engine's
    ignore_eos: test_server_request.c)"""
    lx = LoraxClient(server.base, timeout=60)
    r = lx.generate(PROMPT, max_new_tokens=5, decoder_input_details=True, return_k_alternatives=2)
    want = tgi.generate(PROMPT, max_new_tokens=5, decoder_input_details=True, top_n_tokens=2).details
    assert [t.id for t in r.details.prefill] == [t.id for t in want.prefill] and r.details.prefill[0].logprob is None
    assert r.details.prompt_tokens == len(want.prefill)
    for tok, top in zip(r.details.tokens, want.top_tokens):
        assert [a.id for a in tok.alternative_tokens] == [t.id for t in top]
    b = lx.generate(PROMPT, max_new_tokens=4, best_of=2, do_sample=True)
    assert len(b.details.best_of_sequences) == 1
