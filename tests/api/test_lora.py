"""LoRA adapters through `zse serve`: the openai SDK picks an adapter by model name, LoRAX's
client by adapter_id (adapter_source "local"), /v1/models lists adapters with their parent,
vLLM's load/unload routes, concurrent requests over more adapters than slots, metrics, and
the errors (unknown adapter with the list of names, another adapter_source, bad paths).

Adapters: tests/fixtures/lora/tiny-qwen2 (PEFT, tools/make_lora_fixtures.py); one served by
--lora, one found in a --lora-dir, one as a .zsa file in that directory."""
import concurrent.futures as cf
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import openai
import pytest
from lorax import Client as LoraxClient
from lorax.errors import NotFoundError as LoraxNotFound

from conftest import MODEL_ID, ROOT

LORA = ROOT / "tests" / "fixtures" / "lora" / "tiny-qwen2"
PROMPT = "def fibonacci(n):\n    if n < 2:\n"


@pytest.fixture(scope="module")
def lora_dir(zse_bin, model_path):
    d = tempfile.TemporaryDirectory(prefix="zse-lora-dir-")
    shutil.copytree(LORA / "attn-r8", Path(d.name) / "attn")
    subprocess.run([str(zse_bin), "convert-adapter", str(LORA / "mlp-r16"), "-o", str(Path(d.name) / "mlpzsa.zsa"),
                    "--base", str(model_path)], check=True, capture_output=True, timeout=60)
    yield Path(d.name)
    d.cleanup()


@pytest.fixture(scope="module")
def lserver(server_factory, lora_dir):
    # two slots for three adapters (and one loaded at run time): requests queue for slots
    s = server_factory("--lora", f"mlp={LORA / 'mlp-r16'}", "--lora-dir", str(lora_dir), "--max-gpu-loras", "2",
                       "--max-cpu-loras", "2", "--allow-lora-loading", "--max-seqs", "16")
    yield s
    rc, log = s.close()
    assert rc == 0, log[-4000:]
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]


def complete(client, model, prompt=PROMPT, n=12):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text, r.model


def run_cli(zse_bin, model_path, adapter=None, n=12):
    cmd = [str(zse_bin), "run", str(model_path), "-p", PROMPT, "--temp", "0", "-n", str(n), "--threads", "2"]
    if adapter:
        cmd += ["--lora", str(adapter)]
    out = subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out.stdout.decode().rstrip("\n")


def test_models_list_adapters(lserver):
    client = lserver.client()
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == MODEL_ID and set(ids[1:]) == {"mlp", "attn", "mlpzsa"}
    body = httpx.get(lserver.url("/v1/models"), timeout=10).json()
    for m in body["data"][1:]:
        assert m["parent"] == MODEL_ID and m["object"] == "model"
    assert "parent" not in body["data"][0]
    assert client.models.retrieve("attn").id == "attn"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_openai_model_picks_adapter(lserver, zse_bin, model_path, lora_dir):
    client = lserver.client()
    base, model = complete(client, MODEL_ID)
    assert model == MODEL_ID
    outs = {}
    for name, path in (("mlp", LORA / "mlp-r16"), ("attn", lora_dir / "attn"), ("mlpzsa", lora_dir / "mlpzsa.zsa")):
        text, model = complete(client, name)
        assert model == name
        # the server's answer is `zse run --lora`'s (the CPU's rows do not depend on the batch)
        assert text == run_cli(zse_bin, model_path, path)
        outs[name] = text
    assert outs["mlp"] == outs["mlpzsa"]  # the .zsa holds the same adapter
    assert outs["mlp"] != base or outs["attn"] != base  # adapters change the output
    chat = client.chat.completions.create(model="attn", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.model == "attn" and chat.choices[0].message.content is not None


def test_lorax_client(lserver):
    client = lserver.client()
    want, _ = complete(client, "attn", n=10)
    lx = LoraxClient(lserver.base, timeout=60)
    r = lx.generate(PROMPT, adapter_id="attn", adapter_source="local", max_new_tokens=10)
    assert r.generated_text == want
    assert r.details.generated_tokens == 10 and r.details.prompt_tokens > 0
    streamed = "".join(t.token.text for t in lx.generate_stream(PROMPT, adapter_id="attn", max_new_tokens=10))
    assert streamed == want
    # the base model: no adapter_id, or the model's own name
    base, _ = complete(client, MODEL_ID, n=10)
    assert lx.generate(PROMPT, max_new_tokens=10).generated_text == base
    assert lx.generate(PROMPT, adapter_id=MODEL_ID, max_new_tokens=10).generated_text == base
    with pytest.raises(LoraxNotFound) as e:
        lx.generate(PROMPT, adapter_id="nope", max_new_tokens=2)
    assert "'nope'" in str(e.value) and "'attn'" in str(e.value) and "'mlp'" in str(e.value)
    r = httpx.post(lserver.url("/generate"), timeout=30,
                   json={"inputs": "x", "parameters": {"adapter_id": "attn", "adapter_source": "hub"}})
    assert r.status_code == 400 and "adapter_source 'hub'" in r.json()["error"]


def test_unknown_adapter_lists_names(lserver):
    client = lserver.client()
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "missing")
    msg = str(e.value)
    assert "'missing' does not exist" in msg and "'attn'" in msg and "'mlp'" in msg and "'mlpzsa'" in msg
    # a name that would leave the adapter directory is only ever a name
    with pytest.raises(openai.NotFoundError):
        complete(client, "../attn")


def test_load_and_unload(lserver):
    client = lserver.client()
    r = httpx.post(lserver.url("/v1/load_lora_adapter"), timeout=30,
                   json={"lora_name": "late", "lora_path": str(LORA / "attn-r8")})
    assert r.status_code == 200 and "late" in r.text
    text, model = complete(client, "late")
    assert model == "late" and text == complete(client, "attn")[0]
    r = httpx.post(lserver.url("/v1/load_lora_adapter"), timeout=30,
                   json={"lora_name": "late", "lora_path": str(LORA / "attn-r8")})
    assert r.status_code == 400 and "already" in r.json()["error"]["message"]
    r = httpx.post(lserver.url("/v1/load_lora_adapter"), timeout=30,
                   json={"lora_name": "bad", "lora_path": "/nonexistent/adapter"})
    assert r.status_code == 400 and "/nonexistent/adapter" in r.json()["error"]["message"]
    r = httpx.post(lserver.url("/v1/load_lora_adapter"), timeout=30, json={"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert httpx.post(lserver.url("/v1/unload_lora_adapter"), timeout=30, json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")
    r = httpx.post(lserver.url("/v1/unload_lora_adapter"), timeout=30, json={"lora_name": "late"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    # a field the route does not know is refused, naming it and the route (vLLM's lora_int_id too)
    r = httpx.post(lserver.url("/v1/load_lora_adapter"), timeout=30,
                   json={"lora_name": "y", "lora_path": str(LORA / "attn-r8"), "base_model_name": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "base_model_name"
    assert r.json()["error"]["message"].startswith("unsupported field 'base_model_name' for /v1/load_lora_adapter")
    r = httpx.post(lserver.url("/v1/unload_lora_adapter"), timeout=30, json={"lora_name": "mlp", "lora_int_id": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_int_id"
    r = httpx.post(lserver.url("/v1/load_lora_adapter"), timeout=30,
                   json={"lora_name": "y", "lora_path": str(LORA / "attn-r8"), "load_inplace": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "load_inplace"


def test_concurrent_adapters_match_alone(lserver):
    """24 requests over three adapters and the base with two slots: each answer is its own alone"""
    client = lserver.client()
    names = ["mlp", "attn", "mlpzsa", MODEL_ID]
    prompts = [PROMPT, "import os\nimport sys\n", "class Node:\n"]
    jobs = [(names[i % 4], prompts[i % 3]) for i in range(24)]
    alone = {job: complete(client, job[0], job[1], 8)[0] for job in set(jobs)}
    with cf.ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda job: complete(client, job[0], job[1], 8)[0], jobs))
    assert together == [alone[job] for job in jobs]
    m = lserver.wait_idle()
    assert m["zse_kv_blocks_used"] == 0 and m["zse_lora_adapters_pinned"] == 0


def test_metrics(lserver):
    complete(lserver.client(), "mlp", n=2)
    _, text = lserver.metrics()
    for line in ('zse_lora_slots{tier="slot"} 2', 'zse_lora_slots{tier="host"} 2', "zse_lora_adapters_pinned 0"):
        assert line in text
    samples = {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l.startswith("zse_lora_")}
    assert samples['zse_lora_loads_total{tier="host"}'] >= 3 and samples['zse_lora_loads_total{tier="slot"}'] >= 3
    assert samples['zse_lora_evictions_total{tier="slot"}'] >= 1
    assert sum(samples[f'zse_lora_hits_total{{tier="{t}"}}'] for t in ("slot", "host", "disk")) >= 10


def test_base_server_refuses_adapters(server):
    r = httpx.post(server.url("/v1/load_lora_adapter"), timeout=30, json={"lora_name": "a", "lora_path": "/tmp"})
    assert r.status_code == 404 and "--allow-lora-loading" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="mlp", prompt="x", max_tokens=1)


def test_bad_lora_flags(zse_bin, model_path):
    for args, want in ((["--lora", "noequals"], "NAME=PATH"), (["--lora", f"{MODEL_ID}={LORA / 'mlp-r16'}"], "name the adapter otherwise"),
                       (["--max-lora-rank", "8"], "need adapters")):
        r = subprocess.run([str(zse_bin), "serve", str(model_path), "--port", "0", *args], capture_output=True, timeout=30)
        assert r.returncode == 2 and want in r.stderr.decode(), r.stderr.decode()
    # a bad adapter stops the server at start, saying why
    r = subprocess.run([str(zse_bin), "serve", str(model_path), "--port", "0", "--no-audit", "--lora",
                        "x=/nonexistent/adapter"], capture_output=True, timeout=60)
    assert r.returncode != 0 and "/nonexistent/adapter" in r.stderr.decode()
