"""--tls-cert/--tls-key: HTTPS with a self-signed certificate made by the openssl command."""
import os
import shutil
import subprocess
import tempfile

import httpx
import pytest

from conftest import MODEL_ID


def test_https(server_factory):
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make a test certificate")
    with tempfile.TemporaryDirectory(prefix="zse-tls-") as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
        s = server_factory("--tls-cert", cert, "--tls-key", key, "--no-audit", scheme="https")
        try:
            r = httpx.post(f"https://127.0.0.1:{s.port}/v1/completions", verify=False, timeout=60,
                           json={"model": MODEL_ID, "prompt": "import", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
            c = s.client(http_client=httpx.Client(verify=False))
            assert c.models.list().data[0].id == MODEL_ID
            with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not answered
                r = httpx.get(f"http://127.0.0.1:{s.port}/health", timeout=5)
                r.raise_for_status()
        finally:
            rc, log = s.close()
            assert rc == 0, log[-2000:]
