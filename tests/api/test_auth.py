"""--auth: Bearer keys made with `zse api-key`, per-key sliding-window rate limits with
X-RateLimit headers, 401/429 in OpenAI's shape, and the audit log."""
import os
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID

BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def api_key(zse_bin, db, *args):
    out = subprocess.run([str(zse_bin), "api-key", *args, "--db", db], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


@pytest.fixture(scope="module")
def keys(zse_bin):
    tmp = tempfile.TemporaryDirectory(prefix="zse-keys-")
    db = os.path.join(tmp.name, "keys.db")
    k = {"db": db, "tmp": tmp,
         "open": api_key(zse_bin, db, "create", "open-key"),
         "limited": api_key(zse_bin, db, "create", "limited-key", "--rate-limit", "3/min"),
         "off": api_key(zse_bin, db, "create", "off-key")}
    api_key(zse_bin, db, "disable", "off-key")
    yield k
    tmp.cleanup()


@pytest.fixture(scope="module")
def auth_server(server_factory, keys):
    s = server_factory("--auth", "--cors", "https://app.example", db=keys["db"])
    yield s
    rc, log = s.close()
    assert rc == 0, log[-3000:]


def check_error(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    return err


def test_missing_and_wrong_keys(auth_server, keys):
    check_error(httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, timeout=30), 401, "missing_api_key")
    check_error(httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, timeout=30,
                           headers={"Authorization": "Bearer zse-0123"}), 401, "invalid_api_key")
    check_error(httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, timeout=30,
                           headers={"Authorization": "Basic " + keys["open"]}), 401, "missing_api_key")
    err = check_error(httpx.get(auth_server.url("/v1/models"), timeout=30,
                                headers={"Authorization": "Bearer " + keys["off"]}), 401, "invalid_api_key")
    assert "disabled" in err["message"]
    with pytest.raises(openai.AuthenticationError):
        auth_server.client(api_key="zse-wrong").models.list()
    # probes need no key
    assert httpx.get(auth_server.url("/health"), timeout=30).status_code == 200
    assert httpx.get(auth_server.url("/metrics"), timeout=30).status_code == 200


def test_good_key(auth_server, keys):
    c = auth_server.client(api_key=keys["open"])
    r = c.chat.completions.create(**BODY)
    assert r.choices[0].message.content is not None
    raw = httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, timeout=30,
                     headers={"Authorization": "Bearer " + keys["open"], "Origin": "https://app.example"})
    assert raw.status_code == 200
    assert raw.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-ratelimit-limit" not in raw.headers
    pre = httpx.options(auth_server.url("/v1/chat/completions"), timeout=30,
                        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204 and "Authorization" in pre.headers["access-control-allow-headers"]


def test_rate_limit(auth_server, keys):
    h = {"Authorization": "Bearer " + keys["limited"]}
    seen = []
    for _ in range(3):
        r = httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, headers=h, timeout=30)
        assert r.status_code == 200
        seen.append(int(r.headers["x-ratelimit-remaining"]))
        assert r.headers["x-ratelimit-limit"] == "3"
        assert 0 < int(r.headers["x-ratelimit-reset"]) <= 60
    assert seen == [2, 1, 0]
    r = httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, headers=h, timeout=30)
    err = check_error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining"] == "0"
    with pytest.raises(openai.RateLimitError):
        auth_server.client(api_key=keys["limited"]).chat.completions.create(**BODY)
    # other keys are not limited by it
    assert httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, timeout=30,
                      headers={"Authorization": "Bearer " + keys["open"]}).status_code == 200
    m, text = auth_server.metrics()
    assert m["zse_rate_limit_rejections_total"] >= 2
    assert 'zse_requests_total{route="/v1/chat/completions",status="429"}' in text


def test_key_changes_reach_running_server(auth_server, keys, zse_bin):
    h = {"Authorization": "Bearer " + keys["open"]}
    api_key(zse_bin, keys["db"], "disable", "open-key")
    end = time.time() + 15
    while time.time() < end and httpx.get(auth_server.url("/v1/models"), headers=h, timeout=30).status_code == 200:
        time.sleep(0.1)
    assert httpx.get(auth_server.url("/v1/models"), headers=h, timeout=30).status_code == 401
    api_key(zse_bin, keys["db"], "enable", "open-key")
    end = time.time() + 15
    while time.time() < end and httpx.get(auth_server.url("/v1/models"), headers=h, timeout=30).status_code != 200:
        time.sleep(0.1)
    assert httpx.get(auth_server.url("/v1/models"), headers=h, timeout=30).status_code == 200
    new = api_key(zse_bin, keys["db"], "create", "late-key")
    end = time.time() + 15
    h2 = {"Authorization": "Bearer " + new}
    while time.time() < end and httpx.get(auth_server.url("/v1/models"), headers=h2, timeout=30).status_code != 200:
        time.sleep(0.1)
    assert httpx.get(auth_server.url("/v1/models"), headers=h2, timeout=30).status_code == 200


def test_audit_rows(auth_server, keys, zse_bin):
    h = {"Authorization": "Bearer " + keys["open"]}
    r = httpx.post(auth_server.url("/v1/chat/completions"), json=BODY, headers=h, timeout=30)
    rid = r.json()["id"]
    end = time.time() + 10
    rows = []
    while time.time() < end:
        rows = [x for x in auth_server.audit("--since", "1h") if x["request_id"] == rid]
        if rows:
            break
        time.sleep(0.2)
    assert len(rows) == 1
    row = rows[0]
    assert row["key"] == "open-key" and row["status"] == 200 and row["route"] == "/v1/chat/completions"
    assert row["method"] == "POST" and row["client"] == "127.0.0.1"
    assert row["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert row["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert row["latency_ms"] > 0
    limited = auth_server.audit("--since", "1h", "--key", "limited-key")
    assert {x["status"] for x in limited} == {200, 429}
    # refusals (no valid key) are counted per minute and address, never rows of their own
    assert not any(x["status"] == 401 for x in auth_server.audit("--since", "1h"))
    assert any(x["status"] == 401 and x["client"] == "127.0.0.1" and x["count"] >= 1
               for x in auth_server.audit("--refused", "--since", "1h"))
    listing = subprocess.run([str(zse_bin), "api-key", "list", "--db", keys["db"]], capture_output=True, timeout=30)
    line = next(x for x in listing.stdout.decode().splitlines() if x.startswith("open-key"))
    assert "never" not in line  # last use recorded
