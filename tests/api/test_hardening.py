"""Abusive clients (issue 22): slowloris and slow bodies, bodies sent before the key is
checked, request smuggling, audit flooding, huge bodies against /health, one client
hogging the engine, and the small defects found with them (invalid UTF-8 in errors, 499,
control bytes in logs, logprobs bytes, database mode, lost audit rows), plus HEAD and the
metric names. Every test runs its own small `zse serve` where it needs particular limits;
every wait is bounded. Other loopback addresses (127.0.0.2, ...) stand for other clients:
the whole 127/8 reaches the server."""
import concurrent.futures
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import httpx
import pytest

from conftest import MODEL_ID

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def connect(server, source="127.0.0.1", timeout=10):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", server.port))
    return s


def read_all(s):
    """bytes until the server closes (or the timeout / a reset)"""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            return out
        if not chunk:
            return out
        out += chunk


def closed_by_server(s):
    """True once the server has closed the connection (EOF or reset), without blocking"""
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def status_of(reply):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    return int(m.group(1)) if m else None


def health_seconds(server, source="127.0.0.1", timeout=10):
    t0 = time.time()
    try:
        s = connect(server, source, timeout)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ok = status_of(read_all(s)) == 200
        s.close()
    except OSError:
        ok = False
    return time.time() - t0 if ok else float("inf")


def api_key(zse_bin, db, *args):
    out = subprocess.run([str(zse_bin), "api-key", *args, "--db", db], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stop_ok(server):
    rc, log = server.close()
    assert rc == 0, log[-3000:]
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-3000:]
    return log


# ---- 1. slowloris and slow bodies --------------------------------------------------------

def test_slowloris_and_slow_body(server_factory):
    s = server_factory("--max-connections", "32", "--max-connections-per-ip", "8", "--header-timeout", "2",
                       "--body-timeout", "2", "--quiet")
    try:
        # one address: beyond 8 connections it is refused at once, and /health stays instant
        socks = []
        for _ in range(40):
            try:
                c = connect(s, "127.0.0.2", 5)
                c.sendall(b"GET /health HTTP/1.1\r\n")
                socks.append(c)
            except OSError:
                pass
        time.sleep(0.3)
        assert sum(not closed_by_server(c) for c in socks) <= 8
        waits = [health_seconds(s) for _ in range(16)]
        assert max(waits) < 1.0, waits
        # many addresses, more connections than slots: idle heads are evicted to make room
        for k in range(3, 13):
            for _ in range(6):
                try:
                    c = connect(s, f"127.0.0.{k}", 5)
                    c.sendall(b"GET /health HTTP/1.1\r\n")
                    socks.append(c)
                except OSError:
                    pass
        waits = [health_seconds(s, "127.0.0.100") for _ in range(8)]
        assert max(waits) < 3.0, waits
        # a header line every 0.25 s does not keep a head alive past --header-timeout (those
        # still in the kernel's backlog get their 2 s when accepted)
        t_end = time.time() + 5
        while time.time() < t_end:
            for c in socks:
                try:
                    c.send(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            time.sleep(0.25)
        assert all(closed_by_server(c) for c in socks)
        for c in socks:
            c.close()
        # a body trickling one byte at a time is cut at --body-timeout and audited as 408
        c = connect(s, "127.0.0.50")
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        t0 = time.time()
        while not closed_by_server(c) and time.time() - t0 < 6:
            try:
                c.send(b" ")
            except OSError:
                break
            time.sleep(0.2)
        assert time.time() - t0 < 4.0
        c.close()
        m, text = s.metrics()
        assert 'zse_http_connections_closed_total{reason="header_timeout"}' in text
        assert re.search(r'reason="body_timeout"\} [1-9]', text)
        for _ in range(20):
            if any(r["status"] == 408 for r in s.audit("--since", "1h")):
                break
            time.sleep(0.2)
        assert any(r["status"] == 408 and r["client"] == "127.0.0.50" for r in s.audit("--since", "1h"))
    finally:
        stop_ok(s)


# ---- 2. no body is read before the key is checked ------------------------------------------

def test_unauthenticated_uploads_are_not_buffered(server_factory):
    s = server_factory("--auth", "--max-refused-per-ip", "0", "--quiet", "--no-audit")
    body_size = 4 << 20
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(body_size).encode() + b"\r\n\r\n")
    chunk = b" " * (64 << 10)

    def upload(_):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        try:
            c.sendall(head + chunk)
            status = status_of(c.recv(4096))  # answered with 60 of the 4096 KB sent
            try:
                for _ in range(body_size // len(chunk)):
                    c.sendall(chunk)
            except OSError:
                pass  # the server closed: the rest goes nowhere
            return status
        finally:
            c.close()

    try:
        base = rss_mb(s.proc.pid)
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(upload, range(300)))
        time.sleep(0.5)
        grown = rss_mb(s.proc.pid) - base
        assert statuses.count(401) == 300, statuses[:10]
        assert grown < 64, f"RSS grew {grown:.0f} MB"
        m, _ = s.metrics()
        assert m["zse_http_body_bytes_buffered"] == 0
    finally:
        stop_ok(s)


# ---- 3. request smuggling ------------------------------------------------------------------

SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


def test_smuggling_is_refused(server):
    body = json.dumps({"model": MODEL_ID, "prompt": "x", "max_tokens": 1}).encode()
    cases = [
        # two different lengths: the first wins in libmicrohttpd and the rest ran as a request
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(body)
         + body + SMUGGLED, 400),
        # length and chunked together
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
         % (len(body) + 10) + b"0\r\n\r\n" + SMUGGLED, 400),
        # codings it does not know waited for the timeout
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n" + body, 501),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 501),
        # HTTP/1.1 requires Host
        (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    ]
    for data, want in cases:
        c = connect(server, timeout=5)
        t0 = time.time()
        c.sendall(data)
        reply = read_all(c)
        c.close()
        assert time.time() - t0 < 3, data[:60]
        assert status_of(reply) == want, (data[:60], reply[:200])
        assert len(re.findall(rb"HTTP/1\.1 \d{3} ", reply)) == 1, reply  # nothing smuggled through
        assert b"connection: close" in reply.lower()
        assert b'"error"' in reply


# ---- 4. audit flooding ---------------------------------------------------------------------

def test_audit_flood_keeps_real_rows(server_factory, zse_bin):
    tmp = tempfile.TemporaryDirectory(prefix="zse-flood-")
    db = os.path.join(tmp.name, "zse.db")
    key = api_key(zse_bin, db, "create", "real")
    s = server_factory("--auth", "--audit-max-rows", "20", "--max-refused-per-ip", "300", "--quiet", db=db)
    hdr = {"Authorization": "Bearer " + key}
    stop = threading.Event()
    flood = {"sent": 0, "unanswered": 0}

    def flooder(paths):
        while not stop.is_set():
            try:
                c = connect(s, "127.0.0.2", 2)
                c.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths))
                reply = read_all(c)
                c.close()
                flood["sent"] += 1
                flood["unanswered"] += reply == b""
            except OSError:
                flood["sent"] += 1
                flood["unanswered"] += 1

    try:
        ok = 0
        for _ in range(3):
            ok += httpx.post(s.url("/v1/chat/completions"), json=CHAT, headers=hdr, timeout=30).status_code == 200
        threads = [threading.Thread(target=flooder, args=(p,)) for p in
                   ([b"/nope"] * 50, [b"/v1/models"] * 50, [b"/v1/chat/completions"] * 50, [b"/x\r\n"] * 50)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(3):  # real requests during the flood, from another address
            ok += httpx.post(s.url("/v1/chat/completions"), json=CHAT, headers=hdr, timeout=30).status_code == 200
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(10)
        assert ok == 6
        assert flood["sent"] > 300 and flood["unanswered"] > 0  # past its budget the address gets nothing
        m, _ = s.metrics()
        assert m["zse_refused_requests_unanswered_total"] > 0
    finally:
        stop.set()
        stop_ok(s)  # the last write and a prune to --audit-max-rows happen at shutdown
    rows = subprocess.run([str(zse_bin), "audit", "--db", db, "--json", "--since", "1h"], capture_output=True,
                          timeout=60, check=True)
    rows = json.loads(rows.stdout)
    assert [r["key"] for r in rows] == ["real"] * 6, rows
    refused = subprocess.run([str(zse_bin), "audit", "--db", db, "--json", "--since", "1h", "--refused"],
                             capture_output=True, timeout=60, check=True)
    refused = json.loads(refused.stdout)
    assert sum(r["count"] for r in refused if r["client"] == "127.0.0.2") >= 300
    assert {r["status"] for r in refused} >= {401, 404}
    tmp.cleanup()


# ---- 5. huge bodies cannot starve /health --------------------------------------------------

def test_big_bodies_do_not_starve_health(server_factory):
    s = server_factory("--max-body", "4M", "--quiet", "--no-audit")
    body = json.dumps({"model": MODEL_ID, "prompt": " " * ((4 << 20) - 200), "max_tokens": 1}).encode()
    stop = threading.Event()
    answers = []

    def poster():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(s.url("/v1/completions"), content=body, headers={"Content-Type": "application/json"})
                answers.append((r.status_code, r.json()["error"]["code"]))

    try:
        threads = [threading.Thread(target=poster) for _ in range(8)]
        for t in threads:
            t.start()
        waits = []
        t_end = time.time() + 4
        while time.time() < t_end:
            waits.append(health_seconds(s, timeout=10))
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        waits.sort()
        assert waits[-1] < 1.0, waits[-5:]
        assert len(answers) >= 8
        assert set(answers) == {(400, "context_length_exceeded")}
    finally:
        stop.set()
        stop_ok(s)


# ---- 6. fairness between keys, priorities as the operator's decision -------------------------

def test_one_key_cannot_starve_another(server_factory, zse_bin):
    tmp = tempfile.TemporaryDirectory(prefix="zse-fair-")
    db = os.path.join(tmp.name, "zse.db")
    keys = {name: api_key(zse_bin, db, "create", name) for name in ("hog", "small", "plain")}
    keys["vip"] = api_key(zse_bin, db, "create", "vip", "--priority", "-10")
    s = server_factory("--auth", "--max-seqs", "4", "--quiet", db=db)

    def hdr(name):
        return {"Authorization": "Bearer " + keys[name]}

    hog_body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1900, "n": 2,
                "ignore_eos": True, "stream": True}
    streams = []

    def hog_stream(n):
        c = connect(s, "127.0.0.2", 10)
        payload = json.dumps({**hog_body, "n": n}).encode()
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + keys["hog"].encode() +
                  b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        streams.append(c)

    def wait_for(name, value):
        t_end = time.time() + 10
        while time.time() < t_end and s.metrics()[0].get(name, 0) < value:
            time.sleep(0.05)
        return s.metrics()[0]

    try:
        # the hog streams two requests of long choices (4 and 2) and never reads them
        hog_stream(4)
        wait_for("zse_running_sequences", 3)
        hog_stream(2)
        m = wait_for("zse_queue_depth", 3)
        assert m["zse_running_sequences"] == 3 and m["zse_queue_depth"] == 3, m  # its share: 3 of 4
        # another key's short request completes meanwhile
        t0 = time.time()
        r = httpx.post(s.url("/v1/chat/completions"), json=CHAT, headers=hdr("small"), timeout=30)
        assert r.status_code == 200 and time.time() - t0 < 10
        # and the engine shared its compute by key: the hog's sequences sat out steps beside it
        m = s.metrics()[0]
        assert m["zse_fair_waits_total"] > 0 and m["zse_tenants"] == 1, m
        # a third big request exceeds the tokens the hog may have waiting
        r = httpx.post(s.url("/v1/chat/completions"), json={**hog_body, "stream": False}, headers=hdr("hog"),
                       timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_queued_tokens", r.text
        assert int(r.headers["retry-after"]) >= 1
        # priorities are granted per key: a plain key may only ask for less urgency
        r = httpx.post(s.url("/v1/chat/completions"), json={**CHAT, "priority": -5}, headers=hdr("plain"), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
        assert "zse api-key set-priority" in r.json()["error"]["message"]
        r = httpx.post(s.url("/v1/chat/completions"), json={**CHAT, "priority": 7}, headers=hdr("plain"), timeout=30)
        assert r.status_code == 200
        r = httpx.post(s.url("/v1/chat/completions"), json={**CHAT, "priority": -5}, headers=hdr("vip"), timeout=30)
        assert r.status_code == 200
    finally:
        for c in streams:
            c.close()
        m = s.wait_idle(30)
        assert m["zse_running_sequences"] == 0 and m["zse_kv_blocks_used"] == 0, m
        stop_ok(s)
        tmp.cleanup()


# ---- 7. errors quoting invalid UTF-8 -------------------------------------------------------

def test_invalid_utf8_in_errors(server):
    r = httpx.get(server.url("/%ff"), timeout=10)
    assert r.status_code == 404 and "\\xff" in r.json()["error"]["message"]
    long_name = "\u00e9" * 400  # 800 bytes: the 600-byte message is cut inside a character
    r = httpx.post(server.url("/v1/chat/completions"), timeout=10,
                   json={"model": long_name, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(server.url("/v1/models/%ff%fe"), timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    rows = [x for x in server.audit_until(lambda x: x["route"].startswith("/v1/models/\\x"), "--since", "1h")
            if x["route"].startswith("/v1/models/\\x")]
    assert rows and rows[-1]["route"] == "/v1/models/\\xff\\xfe"


# ---- 8. a client that leaves a non-streaming request is a 499 -----------------------------------

def test_client_leaving_non_streaming_is_499(server):
    payload = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "leaving"}],
                          "max_tokens": 1500, "ignore_eos": True}).encode()
    c = connect(server, "127.0.0.8")
    c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(payload)).encode() +
              b"\r\n\r\n" + payload)
    time.sleep(0.5)
    c.close()
    rows = [x for x in server.audit_until(lambda x: x["client"] == "127.0.0.8", "--since", "1h")
            if x["client"] == "127.0.0.8"]
    assert [x["status"] for x in rows] == [499], rows
    m = server.wait_idle(30)
    assert m["zse_running_sequences"] == 0 and m["zse_kv_blocks_used"] == 0


# ---- 9. control bytes from URLs never reach logs raw -------------------------------------------

def test_control_bytes_escaped_in_logs(server):
    c = connect(server)
    c.sendall(b"GET /v1/models/x%0d%0aFORGED-LINE%1b%5b31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(read_all(c)) == 404
    c.close()
    rows = [x for x in server.audit_until(lambda x: "FORGED" in x["route"], "--since", "1h") if "FORGED" in x["route"]]
    assert rows and rows[-1]["route"] == "/v1/models/x\\x0d\\x0aFORGED-LINE\\x1b[31m"
    table = subprocess.run([str(server.zse_bin), "audit", "--db", server.db, "--since", "1h"], capture_output=True,
                           timeout=60, check=True).stdout
    assert b"\x1b" not in table and not re.search(rb"^FORGED", table, re.M)
    log = server._read_log()
    assert "\x1b" not in log and not re.search(r"^FORGED", log, re.M)
    assert "path=/v1/models/x\\x0d\\x0aFORGED-LINE\\x1b[31m" in log


# ---- 10. logprobs bytes of a token holding part of a character -----------------------------------

def test_logprobs_bytes_of_partial_utf8_token(server):
    # in the byte-level vocabulary "ä" (id 163) stands for the byte 0xE4 alone
    vocab = json.load(open(os.path.join(os.path.dirname(__file__), "../fixtures/tiny-qwen2/tokenizer.json")))
    tid = vocab["model"]["vocab"]["\u00e4"]
    r = httpx.post(server.url("/v1/chat/completions"), timeout=30,
                   json={"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                         "temperature": 0, "logit_bias": {str(tid): 100}, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    entry = r.json()["choices"][0]["logprobs"]["content"][0]
    assert entry["bytes"] == [0xE4] and entry["token"] == "\ufffd"
    for alt in entry["top_logprobs"]:  # whole characters: their UTF-8
        assert alt["token"] == "\ufffd" or alt["bytes"] == list(alt["token"].encode()), alt
    r = httpx.post(server.url("/v1/completions"), timeout=30,
                   json={"model": MODEL_ID, "prompt": "x", "max_tokens": 1, "temperature": 0,
                         "logit_bias": {str(tid): 100}, "logprobs": 3})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["\ufffd"] and len(lp["top_logprobs"][0]) >= 1


# ---- 11. the database is made private ------------------------------------------------------------

def test_database_mode_tightened(server_factory, zse_bin):
    tmp = tempfile.TemporaryDirectory(prefix="zse-mode-")
    db = os.path.join(tmp.name, "zse.db")
    api_key(zse_bin, db, "create", "someone")
    os.chmod(db, 0o644)
    s = server_factory("--quiet", db=db)
    try:
        assert os.stat(db).st_mode & 0o777 == 0o600
        assert "made it 0600" in s._read_log()
    finally:
        stop_ok(s)
        tmp.cleanup()


# ---- 12. audit rows lost to a failed write are counted ----------------------------------------------

def test_audit_write_failures_counted(server_factory, zse_bin):
    tmp = tempfile.TemporaryDirectory(prefix="zse-full-")
    db = os.path.join(tmp.name, "zse.db")
    api_key(zse_bin, db, "list")  # the schema exists before the limit applies
    limit = os.path.getsize(db) + (16 << 10)

    def small_files():  # every file the server writes stops growing at `limit` (a full disk)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    s = server_factory("--quiet", db=db, preexec_fn=small_files)
    try:
        dropped = 0
        for _ in range(60):
            assert httpx.get(s.url("/v1/models"), timeout=10).status_code == 200
            time.sleep(0.05)
            dropped = s.metrics()[0]["zse_audit_rows_dropped_total"]
            if dropped > 0:
                break
        assert dropped > 0
        assert "rows not written" in s._read_log()
    finally:
        stop_ok(s)
        tmp.cleanup()


# ---- HEAD and the metric names (issue 20) ------------------------------------------------------------

def test_head_answers_like_get(server):
    for path in ("/health", "/v1/models", "/metrics"):
        get = httpx.get(server.url(path), timeout=10)
        head = httpx.head(server.url(path), timeout=10)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert httpx.post(server.url("/health"), timeout=10).headers["allow"] == "GET, HEAD"


def check_exposition(text):
    """the Prometheus text format's naming rules, as promtool enforces them"""
    types, helps = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
    for name, kind in types.items():
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), name
        assert name in helps, f"{name} has no HELP"
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
        else:
            assert not name.endswith("_total"), f"{kind} {name} must not end in _total"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line).group(1)
            base = re.sub(r"_(bucket|sum|count)$", "", sample)
            assert sample in types or (base in types and types[base] == "histogram"), sample


def test_metric_names(server):
    text = httpx.get(server.url("/metrics"), timeout=10).text
    check_exposition(text)
    assert "zse_kv_blocks_capacity " in text and "zse_kv_blocks_total" not in text
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package
        out = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
