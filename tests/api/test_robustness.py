"""Bad clients: malformed HTTP over raw sockets, invalid UTF-8 and JSON, huge bodies and
max_tokens, clients that vanish mid-stream or read slowly. The server answers or closes,
keeps serving everyone else, and ends with nothing running."""
import socket
import threading
import time

import httpx

from conftest import MODEL_ID


def raw(server, data, read=True, timeout=10):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        while read:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def healthy(server):
    return httpx.get(server.url("/health"), timeout=10).status_code == 200


def status_of(reply):
    if not reply.startswith(b"HTTP/1."):
        return None
    return int(reply.split(b" ", 2)[1])


def test_malformed_http(server):
    junk = [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/7.0\r\n\r\n",
        b"\x00\x01\x02\xff\xfe\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n",
        b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"",  # short body
    ]
    for data in junk:
        reply = raw(server, data)
        st = status_of(reply)
        assert st is None or st >= 400, (data[:40], reply[:200])
        assert healthy(server)


def test_bad_bodies(server):
    url = server.url("/v1/chat/completions")
    bodies = [b"\xff\xfe\xfd", b'{"model":"tiny-qwen2","messages":[{"role":"user","content":"\xc3\x28"}]}',
              b'{"model":"tiny-qwen2","messages":[{"role":"user","content":"ok"}]', b"null", b"1e999999",
              b'{"model":"tiny-qwen2","messages":' + b"[" * 100000 + b"]" * 100000 + b"}",
              b'{"model":"tiny-qwen2","messages":[{"role":"user","content":"' + b"\\ud800" + b'"}]}']
    for b in bodies:
        r = httpx.post(url, content=b, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (b[:60], r.text)
        assert "error" in r.json()
    assert healthy(server)


def test_huge_max_tokens(client, server):
    r = httpx.post(server.url("/v1/chat/completions"), timeout=30,
                   json={"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2 ** 31 - 1})
    assert r.status_code == 400 and "2147483647" in r.json()["error"]["message"]
    r = httpx.post(server.url("/v1/chat/completions"), timeout=30,
                   json={"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2 ** 63})
    assert r.status_code == 400
    assert healthy(server)


def test_many_idle_connections(server):
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(50)]
    try:
        assert healthy(server)
        r = httpx.post(server.url("/v1/completions"), timeout=60,
                       json={"model": MODEL_ID, "prompt": "import", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        for s in socks:
            s.close()


def test_disconnect_mid_stream(server):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    for _ in range(4):
        with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=60) as r:
            lines = 0
            for line in r.iter_lines():
                lines += bool(line)
                if lines >= 3:
                    break  # leaving with the stream open
    # a non-streaming client that gives up while waiting
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    payload = (b'{"model":"tiny-qwen2","messages":[{"role":"user","content":"hi"}],"max_tokens":1500,'
               b'"ignore_eos":true}')
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    time.sleep(0.3)
    s.close()
    m = server.wait_idle(30)
    assert m["zse_running_sequences"] == 0 and m["zse_kv_blocks_used"] == 0, m
    assert m["zse_http_requests_active"] == 0, m


def test_slow_reader_does_not_block_others(server):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    payload = (b'{"model":"tiny-qwen2","messages":[{"role":"user","content":"hi"}],"max_tokens":400,'
               b'"ignore_eos":true,"stream":true,"logprobs":true,"top_logprobs":20}')
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    got = 0
    stop = threading.Event()

    def trickle():
        nonlocal got
        while not stop.is_set():
            try:
                got += len(s.recv(64))
            except OSError:
                return
            time.sleep(0.05)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        t0 = time.time()
        for _ in range(5):
            r = httpx.post(server.url("/v1/completions"), timeout=60,
                           json={"model": MODEL_ID, "prompt": "def f():", "max_tokens": 4})
            assert r.status_code == 200
        assert time.time() - t0 < 30
        assert got > 0
    finally:
        stop.set()
        t.join(10)
        s.close()
    m = server.wait_idle(30)
    assert m["zse_running_sequences"] == 0 and m["zse_kv_blocks_used"] == 0, m
