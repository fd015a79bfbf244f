"""Fixtures for the API tests: a real `zse serve` on the tiny-qwen2 fixture.

The model is converted with `zse convert` into the build folder once per run. Servers listen
on 127.0.0.1 with port 0 (the kernel picks a free port; the server prints it), use a
database in a temporary folder, and are stopped with SIGTERM at the end, which must exit 0.
Every wait is bounded.
"""
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "tiny-qwen2"


def _zse_bin():
    env = os.environ.get("ZSE_BIN")
    if env:
        return Path(env)
    for build in ("build-test", "build"):
        p = ROOT / build / "zse"
        if p.exists():
            return p
    pytest.exit("zse binary not found: set ZSE_BIN", returncode=1)


def _fixture_dir():
    """tests/fixtures/tiny-qwen2, else ../shared/fixtures/tiny-qwen2; None when neither exists"""
    for d in (ROOT / "tests" / "fixtures" / "tiny-qwen2", ROOT.parent / "shared" / "fixtures" / "tiny-qwen2"):
        if (d / "model.safetensors").exists() and (d / "tokenizer.json").exists():
            return d
    return None


def _build_dir():
    env = os.environ.get("ZSE_BUILD")
    return Path(env) if env else _zse_bin().parent


@pytest.fixture(scope="session")
def zse_bin():
    return _zse_bin()


@pytest.fixture(scope="session")
def model_path(zse_bin):
    src = _fixture_dir()
    if src is None:
        pytest.skip("the tiny-qwen2 fixture is not available (tests/fixtures or ../shared/fixtures)")
    out_dir = _build_dir() / "api-tests"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{MODEL_ID}.zse"
    if not out.exists():
        tmp = out_dir / f"{MODEL_ID}.converting.zse"
        subprocess.run([str(zse_bin), "convert", str(src), "-o", str(tmp), "--quant", "int8"],
                       check=True, capture_output=True, timeout=300)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def f32_model_path(zse_bin, model_path):
    """the fixture converted at f32, for comparisons with transformers' numbers"""
    out = model_path.parent / f"{MODEL_ID}-f32.zse"
    if not out.exists():
        tmp = model_path.parent / f"{MODEL_ID}-f32.converting.zse"
        subprocess.run([str(zse_bin), "convert", str(_fixture_dir()), "-o", str(tmp), "--quant", "f32", "--force"],
                       check=True, capture_output=True, timeout=300)
        tmp.rename(out)
    return out


class Server:
    """One `zse serve` process and ways to talk to it."""

    def __init__(self, zse_bin, model, extra_args=(), db=None, api_key="unused", scheme="http", preexec_fn=None,
                 env=None):
        self.tmp = tempfile.TemporaryDirectory(prefix="zse-api-")
        self.db = db or os.path.join(self.tmp.name, "zse.db")
        self.log_path = os.path.join(self.tmp.name, "serve.log")
        self.api_key = api_key
        self.zse_bin = zse_bin
        args = [str(zse_bin), "serve", str(model), "--host", "127.0.0.1", "--port", "0",
                "--db", self.db, "--threads", "2", *extra_args]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                                     env=None if env is None else {**os.environ, **env})
        self.scheme = scheme
        self.port = self._wait_for_port(60)
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self._wait_ready(120)

    def _read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def _wait_for_port(self, seconds):
        end = time.time() + seconds
        while time.time() < end:
            m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", self._read_log())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"zse serve exited ({self.proc.returncode}):\n{self._read_log()}")
            time.sleep(0.05)
        raise RuntimeError("zse serve did not start listening:\n" + self._read_log())

    def _wait_ready(self, seconds):
        end = time.time() + seconds
        while time.time() < end:
            try:
                if httpx.get(self.base + "/health", timeout=5, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"zse serve exited ({self.proc.returncode}):\n{self._read_log()}")
            time.sleep(0.05)
        raise RuntimeError("zse serve did not become ready:\n" + self._read_log())

    def client(self, **kw):
        kw.setdefault("api_key", self.api_key)
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.base + "/v1", **kw)

    def url(self, path):
        return self.base + path

    def metrics(self):
        """the unlabelled samples of /metrics as {name: value}"""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()
                out[name] = float(value)
        return out, text

    def wait_idle(self, seconds=20):
        """waits until nothing runs or waits and no KV block is held; returns the metrics"""
        end = time.time() + seconds
        while True:
            m, _ = self.metrics()
            if m.get("zse_running_sequences") == 0 and m.get("zse_queue_depth") == 0 and \
                    m.get("zse_kv_blocks_used") == 0 and m.get("zse_http_requests_active") == 0:
                return m
            if time.time() > end:
                return m
            time.sleep(0.05)

    def audit(self, *args):
        out = subprocess.run([str(self.zse_bin), "audit", "--db", self.db, "--json", *args],
                             check=True, capture_output=True, timeout=60)
        return json.loads(out.stdout)

    def audit_until(self, pred, *args, timeout=10):
        """the audit rows once one satisfies pred (the writer commits after the answer is
        sent), or the last rows read when timeout seconds pass"""
        end = time.time() + timeout
        while True:
            rows = self.audit(*args)
            if any(pred(r) for r in rows) or time.time() > end:
                return rows
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        return self.proc.returncode

    def close(self):
        rc = self.stop()
        log = self._read_log()
        self.tmp.cleanup()
        return rc, log


@pytest.fixture(scope="session")
def server_factory(zse_bin, model_path):
    started = []

    def make(*extra_args, **kw):
        s = Server(zse_bin, model_path, extra_args, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        if s.proc.poll() is None:
            s.close()


@pytest.fixture(scope="session")
def server(server_factory):
    """the shared server; its SIGTERM at the end must exit 0"""
    s = server_factory("--max-seqs", "16", "--max-body", "1M", "--timeout", "10")
    yield s
    rc, log = s.close()
    assert rc == 0, log[-4000:]
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]


@pytest.fixture(scope="session")
def client(server):
    return server.client()


def chat_text(client, content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": content}], **kw)
    return r.choices[0].message.content
