"""SIGTERM/SIGINT: stop accepting, let running requests finish within --shutdown-timeout (or
end them), write the audit log, exit 0. /health says 503 while loading is covered by the C
test (tests/unit/test_server_http.c) since the fixture loads in milliseconds."""
import signal
import socket
import threading
import time

import httpx
import pytest

from conftest import MODEL_ID


def test_sigterm_finishes_running_requests(server_factory):
    s = server_factory("--shutdown-timeout", "60")
    result = {}
    first = threading.Event()

    def long_stream():
        text = []
        with httpx.stream("POST", s.url("/v1/chat/completions"), timeout=120,
                          json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 60, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                first.set()
                if line:
                    text.append(line)
        result["lines"] = text

    t = threading.Thread(target=long_stream)
    t.start()
    assert first.wait(60)
    s.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert result["lines"][-1] == "data: [DONE]"  # the request ran to its end
    assert s.proc.wait(60) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()
    rows = s.audit("--since", "1h")
    assert any(r["route"] == "/v1/chat/completions" and r["status"] == 200 and r["completion_tokens"] == 60
               for r in rows), rows
    rc, log = s.close()
    assert rc == 0 and "SIGTERM: shutting down" in log and "zse serve: stopped" in log


def test_sigint_ends_requests_past_the_timeout(server_factory):
    s = server_factory("--shutdown-timeout", "0.5", "--no-audit")
    result = {}
    first = threading.Event()

    def endless():
        lines = []
        try:
            with httpx.stream("POST", s.url("/v1/chat/completions"), timeout=120,
                              json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 1900, "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    first.set()
                    lines.append(line)
        except httpx.HTTPError as e:
            result["error"] = e
        result["lines"] = lines

    t = threading.Thread(target=endless)
    t.start()
    assert first.wait(60)
    t0 = time.time()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(60) == 0
    assert time.time() - t0 < 30
    t.join(60)
    rc, log = s.close()
    assert "SIGINT: shutting down" in log


def test_port_in_use_is_an_error(server, zse_bin, model_path, tmp_path):
    """A second server on a port that is taken must fail clearly, not share the port."""
    import subprocess
    p = subprocess.run([str(zse_bin), "serve", str(model_path), "--host", "127.0.0.1", "--port", str(server.port),
                        "--db", str(tmp_path / "zse.db"), "--no-audit"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert f"cannot listen on 127.0.0.1:{server.port}" in p.stderr, p.stderr
    # the first server is unharmed
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200
