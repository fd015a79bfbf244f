"""/v1/embeddings (openai SDK, against transformers' goldens), vLLM's tokenizer routes, the chat
template's options (chat_template_kwargs, continue_final_message, add_generation_prompt),
--served-model-name, --chat-template (serve and convert), --pooling and the ZSE_ variables."""
import base64
import json
import math
import re
import struct
import subprocess
import time

import httpx
import openai
import pytest

from conftest import ROOT, Server, _fixture_dir

FIXTURE = ROOT / "tests" / "fixtures" / "tiny-qwen2"
NAME = "tiny-qwen2-f32"
ALIAS = "qwen-tiny"
TEMPLATE_A = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<go>{% endif %}"
TEMPLATE_B = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}[assistant]{% if enable_thinking %}<think>{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def xs(zse_bin, f32_model_path):
    s = Server(zse_bin, f32_model_path, ("--served-model-name", NAME, ALIAS, "--max-seqs", "4"))
    yield s
    rc, log = s.close()
    assert rc == 0, log[-4000:]
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]


@pytest.fixture(scope="module")
def embed_goldens():
    return json.loads((FIXTURE / "embeddings.json").read_text())["cases"]


def close(a, b, tol=2e-4):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def test_embeddings_match_transformers(xs, embed_goldens):
    client = xs.client()
    texts = [c["text"] for c in embed_goldens]
    r = client.embeddings.create(model=NAME, input=texts)  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == list(range(len(texts)))
    for d, g in zip(r.data, embed_goldens):
        assert close(d.embedding, g["last"]), "last-token pooling, as vLLM embeds with a causal LM"
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-4)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(g["ids"]) for g in embed_goldens)
    as_float = client.embeddings.create(model=ALIAS, input=texts[0], encoding_format="float")
    assert close(as_float.data[0].embedding, r.data[0].embedding, 1e-6)
    by_ids = client.embeddings.create(model=NAME, input=[g["ids"] for g in embed_goldens[:2]])
    assert all(close(d.embedding, g["last"]) for d, g in zip(by_ids.data, embed_goldens))
    one_ids = client.embeddings.create(model=NAME, input=embed_goldens[2]["ids"])
    assert len(one_ids.data) == 1 and close(one_ids.data[0].embedding, embed_goldens[2]["last"])
    raw = httpx.post(xs.url("/v1/embeddings"), timeout=60, json={
        "model": NAME, "input": "x", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    b = base64.b64decode(raw)
    assert close(struct.unpack(f"<{len(b) // 4}f", b), embed_goldens[2]["last"])
    hidden = len(embed_goldens[0]["last"])
    assert len(client.embeddings.create(model=NAME, input="x", dimensions=hidden).data[0].embedding) == hidden


def test_embeddings_errors(xs):
    client = xs.client()
    for kw, param in ((dict(input="x", dimensions=3), "dimensions"), (dict(input=""), "input"),
                      (dict(input=[]), "input"), (dict(input=[[1, 10 ** 7]]), "input"),
                      (dict(input="x", encoding_format="int8"), "encoding_format")):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=NAME, **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")


def test_user_in_request_log(xs):
    """OpenAI's "user" (the client's id of its end user) is in the request's log line"""
    client = xs.client()
    client.embeddings.create(model=NAME, input="x", user="emb-user-7")
    client.completions.create(model=NAME, prompt="hi", max_tokens=2, user="cmp-user-7")
    for _ in range(50):  # the line is written when the request ends
        log = xs._read_log()
        if "user=emb-user-7" in log and "user=cmp-user-7" in log:
            break
        time.sleep(0.1)
    assert re.search(r"path=/v1/embeddings .*user=emb-user-7", log), log[-2000:]
    assert re.search(r"path=/v1/completions .*user=cmp-user-7", log), log[-2000:]


def post(s, path, body):
    r = httpx.post(s.url(path), json=body, timeout=60)
    return r.status_code, r.json()


def test_tokenize_detokenize(xs):
    goldens = json.loads((FIXTURE / "goldens.json").read_text())
    for case in goldens["tokenizer"]:
        st, body = post(xs, "/tokenize", {"prompt": case["text"], "return_token_strs": True})
        assert st == 200 and body["tokens"] == case["ids_with_special"] and body["count"] == len(case["ids"])
        assert body["max_model_len"] == 2048 and len(body["token_strs"]) == body["count"]
        st, body = post(xs, "/detokenize", {"model": ALIAS, "tokens": case["ids"]})
        assert st == 200 and body["prompt"] == case["decoded"]
    for case in goldens["chat"]:  # the template as transformers renders it, then tokenized
        st, body = post(xs, "/tokenize", {"model": NAME, "messages": case["messages"],
                                          "add_generation_prompt": case["add_generation_prompt"],
                                          "chat_template_kwargs": case["template_kwargs"]})
        assert st == 200 and body["tokens"] == case["ids"], case["rendered"]
    assert post(xs, "/tokenize", {"prompt": "x", "model": "nope"})[0] == 404
    assert post(xs, "/tokenize", {})[0] == 400
    assert post(xs, "/tokenize", {"prompt": "x", "messages": []})[0] == 400
    assert post(xs, "/detokenize", {"tokens": [-1]})[0] == 400
    assert post(xs, "/detokenize", {"tokens": "abc"})[0] == 400
    info = httpx.get(xs.url("/tokenizer_info"), timeout=10).json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 2048
    assert info["chat_template"] == (FIXTURE / "chat_template.jinja").read_text()
    assert info["tokenizer_class"]


def test_chat_template_options(xs):
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello th"}]

    def tok(**kw):
        st, body = post(xs, "/tokenize", {"messages": msgs, "return_token_strs": True, **kw})
        assert st == 200, body
        return "".join(body["token_strs"])

    cont = tok(continue_final_message=True, add_generation_prompt=False)
    assert cont.endswith("Hello th")  # left open: no end-of-turn after it
    closed = tok(add_generation_prompt=False)
    assert closed.startswith(cont) and closed[len(cont):].startswith("<|im_end|>")
    assert tok().endswith("<|im_start|>assistant\n")
    # the chat route renders it the same way: the prompt is as many tokens as /tokenize says
    n = post(xs, "/tokenize", {"messages": msgs, "continue_final_message": True, "add_generation_prompt": False})[1]
    r = xs.client().chat.completions.create(model=NAME, messages=msgs, max_tokens=2, temperature=0,
                                            extra_body={"continue_final_message": True,
                                                        "add_generation_prompt": False, "min_tokens": 2})
    assert r.usage.prompt_tokens == n["count"] and r.usage.completion_tokens == 2
    for bad in ({"continue_final_message": True, "add_generation_prompt": True},
                {"continue_final_message": True, "messages": msgs[:1]},
                {"chat_template_kwargs": {"messages": []}}, {"chat_template_kwargs": 3}):
        st, body = post(xs, "/v1/chat/completions", {"model": NAME, "messages": msgs, "max_tokens": 1, **bad})
        assert st == 400, bad


def test_served_model_names(xs):
    client = xs.client()
    assert [m.id for m in client.models.list().data] == [NAME, ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS
    r = client.completions.create(model=ALIAS, prompt="def", max_tokens=2, temperature=0)
    assert r.model == NAME  # answers give the first name
    tgi = httpx.post(xs.url("/generate"), timeout=30, json={"inputs": "def", "parameters": {"adapter_id": ALIAS}})
    assert tgi.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-qwen2", prompt="def", max_tokens=2)


def test_chat_template_files_and_environment(zse_bin, tmp_path):
    """convert --chat-template stores one template; serve --chat-template (here ZSE_CHAT_TEMPLATE)
    replaces it; ZSE_ variables set the flags, and a flag on the command line wins"""
    a, b = tmp_path / "a.jinja", tmp_path / "b.jinja"
    a.write_text(TEMPLATE_A)
    b.write_text(TEMPLATE_B)
    model = tmp_path / "t.zse"
    subprocess.run([str(zse_bin), "convert", str(_fixture_dir()), "-o", str(model), "--quant", "f32",
                    "--chat-template", str(a)], check=True, capture_output=True, timeout=120)
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}))
    out = subprocess.run([str(zse_bin), "template", str(model), "--context", str(ctx)], capture_output=True,
                         timeout=60, text=True)
    assert out.returncode == 0 and out.stdout == "<user>hi<go>"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ x(")
    out = subprocess.run([str(zse_bin), "convert", str(_fixture_dir()), "-o", str(tmp_path / "u.zse"),
                          "--chat-template", str(bad)], capture_output=True, timeout=120, text=True)
    assert out.returncode == 2 and "does not render" in out.stderr and not (tmp_path / "u.zse").exists()

    env = {"ZSE_CHAT_TEMPLATE": str(b), "ZSE_POOLING": "mean", "ZSE_API_KEY": "plain-key-1",
           "ZSE_SERVED_MODEL_NAME": "m1 m2", "ZSE_PORT": "1", "ZSE_QUIET": "1"}
    s = Server(zse_bin, model, (), env=env, api_key="plain-key-1")  # --port 0 on the command line wins
    try:
        client = s.client()
        assert [m.id for m in client.models.list().data] == ["m1", "m2"]
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        hdr = {"Authorization": "Bearer plain-key-1"}
        info = httpx.get(s.url("/tokenizer_info"), headers=hdr, timeout=10).json()
        assert info["chat_template"] == TEMPLATE_B
        body = httpx.post(s.url("/tokenize"), headers=hdr, timeout=10, json={
            "messages": [{"role": "user", "content": "hi"}], "return_token_strs": True,
            "chat_template_kwargs": {"enable_thinking": True}}).json()
        assert "".join(body["token_strs"]) == "[user] hi\n[assistant]<think>"
        goldens = json.loads((FIXTURE / "embeddings.json").read_text())["cases"]
        e = client.embeddings.create(model="m2", input=goldens[0]["text"])
        assert close(e.data[0].embedding, goldens[0]["mean"])
        audit = s.audit_until(lambda row: row["key"] == "api-key", "--since", "1h")
        assert any(row["key"] == "api-key" for row in audit), audit
    finally:
        rc, log = s.close()
    assert rc == 0, log[-3000:]
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-3000:]
    out = subprocess.run([str(zse_bin), "serve", str(model), "--port", "0"], capture_output=True, timeout=60,
                         text=True, env={"PATH": "/usr/bin:/bin", "ZSE_MAX_SEQS": "lots", "ZSE_AUTH": "maybe"})
    assert out.returncode == 2 and "ZSE_AUTH" in out.stderr
    out = subprocess.run([str(zse_bin), "serve", "--port", "0"], capture_output=True, timeout=60, text=True,
                         env={"PATH": "/usr/bin:/bin", "ZSE_MODEL": str(model), "ZSE_MAX_SEQS": "lots"})
    assert out.returncode == 2 and "--max-seqs" in out.stderr and "lots" in out.stderr
