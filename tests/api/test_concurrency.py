"""64 simultaneous streaming clients: all complete, greedy outputs equal the outputs the same
requests get alone, and afterwards nothing runs and no KV block is held (/metrics)."""
import threading

from conftest import MODEL_ID

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(10):", "# read a file\n",
           "def fib(n):", "with open(path) as f:", "try:\n    x = int(s)\n"]


def stream_text(client, prompt, max_tokens):
    out = []
    for ch in client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=max_tokens, stream=True,
                                             messages=[{"role": "user", "content": prompt}]):
        if ch.choices:
            out.append(ch.choices[0].delta.content or "")
    return "".join(out)


def test_64_streaming_clients(server):
    client = server.client()
    alone = {p: stream_text(client, p, 24) for p in PROMPTS}
    results = [None] * 64
    errors = []

    def worker(i):
        try:
            results[i] = stream_text(server.client(), PROMPTS[i % len(PROMPTS)], 24)
        except Exception as e:  # recorded, checked below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    for i, text in enumerate(results):
        assert text == alone[PROMPTS[i % len(PROMPTS)]], i
    m = server.wait_idle()
    assert m["zse_running_sequences"] == 0 and m["zse_queue_depth"] == 0
    assert m["zse_kv_blocks_used"] == 0, m
    assert m["zse_http_requests_active"] == 0
    assert m["zse_time_to_first_token_seconds_count"] >= 64
