"""The OpenAI API through the official `openai` SDK: chat and completions, streaming and
not, n > 1, stop, seeds, logprobs, usage, models."""
import httpx
import openai
import pytest

from conftest import MODEL_ID, chat_text

PROMPT = "Write a Python function that adds two numbers."


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat(client):
    r = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=16,
                                       messages=[{"role": "system", "content": "You write Python."},
                                                 {"role": "user", "content": PROMPT}])
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL_ID
    assert r.created > 1_600_000_000
    assert r.system_fingerprint
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_chat_greedy_is_deterministic(client):
    assert chat_text(client, PROMPT) == chat_text(client, PROMPT)


def test_chat_content_parts_equal_string(client):
    parts = client.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=12,
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}])
    assert parts.choices[0].message.content == chat_text(client, PROMPT, max_tokens=12)


def test_chat_stream(client):
    want = chat_text(client, PROMPT, max_tokens=20)
    chunks = list(client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=20, stream=True,
                                                 messages=[{"role": "user", "content": PROMPT}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [finishes[-1]] and finishes[-1] in ("stop", "length")
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(ch.usage is None for ch in chunks)


def test_chat_stream_include_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": PROMPT}]))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 10 or chunks[-2].choices[0].finish_reason == "stop"
    assert last.usage.prompt_tokens > 10
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server.url("/v1/chat/completions"), timeout=60,
                      json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=8, n=3,
                                       messages=[{"role": "user", "content": PROMPT}])
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1  # greedy: all the same
    assert r.usage.completion_tokens % 3 == 0 and r.usage.completion_tokens > 0
    sampled = client.chat.completions.create(model=MODEL_ID, temperature=1.5, max_tokens=12, n=4, seed=11,
                                             messages=[{"role": "user", "content": PROMPT}])
    assert len(sampled.choices) == 4
    assert len({c.message.content for c in sampled.choices}) > 1  # each choice its own sample


def test_n_choices_stream(client):
    chunks = list(client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=6, n=2, stream=True,
                                                 messages=[{"role": "user", "content": PROMPT}]))
    texts = {0: "", 1: ""}
    finished = set()
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert texts[0] == texts[1] == chat_text(client, PROMPT, max_tokens=6)


def test_stop(client):
    full = chat_text(client, PROMPT, max_tokens=30)
    # a stop string that first occurs part-way through the greedy answer
    k = next(i for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip())
    stop = full[k:k + 2]
    r = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=30, stop=[stop, "@@never@@"],
                                       messages=[{"role": "user", "content": PROMPT}])
    assert r.choices[0].message.content == full[:k]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=30, stop=stop,
                                       messages=[{"role": "user", "content": PROMPT}])
    assert r.choices[0].message.content == full[:k]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=30, stop=stop, stream=True,
        messages=[{"role": "user", "content": PROMPT}]) if ch.choices)
    assert streamed == full[:k]


def test_seed_reproducible(client):
    a = chat_text(client, PROMPT, temperature=1.2, seed=1234, max_tokens=16)
    b = chat_text(client, PROMPT, temperature=1.2, seed=1234, max_tokens=16)
    assert a == b
    others = {chat_text(client, PROMPT, temperature=1.2, seed=s, max_tokens=16) for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_sampling_fields_accepted(client):
    r = client.chat.completions.create(model=MODEL_ID, max_tokens=8, temperature=0.7, top_p=0.9, seed=3,
                                       presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"10": -100},
                                       user="tester", max_completion_tokens=8,
                                       messages=[{"role": "user", "content": PROMPT}])
    assert r.usage.completion_tokens <= 8


def test_logit_bias_steers(server, client):
    # the id of the greedy first token, from TGI's details (same tokenization as completions)
    r = httpx.post(server.url("/generate"), timeout=60,
                   json={"inputs": "def add(a, b):", "parameters": {"max_new_tokens": 1, "details": True}})
    first = r.json()["details"]["tokens"][0]
    base = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=1, temperature=0, logprobs=0)
    assert base.choices[0].logprobs.tokens[0] == first["text"]
    banned = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=1, temperature=0,
                                       logprobs=0, logit_bias={str(first["id"]): -100})
    assert banned.choices[0].logprobs.tokens[0] != first["text"]
    # a large positive bias makes a token the greedy choice; echo of a one-token prompt
    # shows the token's text
    text_300 = client.completions.create(model=MODEL_ID, prompt=[300], max_tokens=1, echo=True,
                                         temperature=0).choices[0].text
    forced = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=1, temperature=0,
                                       logprobs=0, logit_bias={"300": 100})
    assert text_300.startswith(forced.choices[0].logprobs.tokens[0])


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3,
                                       messages=[{"role": "user", "content": PROMPT}])
    c = r.choices[0]
    entries = c.logprobs.content
    assert r.usage.completion_tokens - 1 <= len(entries) <= r.usage.completion_tokens
    assert "".join(e.token for e in entries) == c.message.content
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy picks the most likely
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4
        assert bytes(e.bytes) == e.token.encode()
    plain = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=4,
                                           messages=[{"role": "user", "content": PROMPT}])
    assert plain.choices[0].logprobs is None


def test_completions(client):
    r = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    text = r.choices[0].text
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 2
    echo = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == "def add(a, b):" + text
    many = client.completions.create(model=MODEL_ID, prompt=["def add(a, b):", "import os"], max_tokens=12,
                                     temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == text
    assert many.usage.prompt_tokens > r.usage.prompt_tokens
    default = client.completions.create(model=MODEL_ID, prompt="import", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default length for completions
    stream = list(client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == text
    assert stream[-1].choices[0].finish_reason is not None


def test_completions_token_prompt_and_logprobs(client):
    r = client.completions.create(model=MODEL_ID, prompt=[100, 200, 300], max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_tool_messages_render(client):
    r = client.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=6,
        tools=[{"type": "function", "function": {"name": "add", "description": "adds",
                                                  "parameters": {"type": "object", "properties": {}}}}],
        messages=[{"role": "user", "content": "add 1 and 2"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "3"}])
    assert r.choices[0].message.content is not None
