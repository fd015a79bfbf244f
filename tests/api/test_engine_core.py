"""The engine core through `zse serve`: the prefix cache (a long system prompt sent twice is
found the second time, /metrics counts the hit tokens, answers equal a server started with
--no-prefix-cache) and speculative decoding (--spec ngram: the same greedy answers, counted
drafts; bad flags refused at start)."""
from conftest import MODEL_ID

SYSTEM = ("You are a careful assistant for a Python standard-library code base. Answer in short "
          "sentences, cite module names exactly, and never invent functions. ") * 4


def ask(client, question):
    r = client.chat.completions.create(
        model=MODEL_ID, max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    return r.choices[0].message.content


def test_shared_system_prompt_hits(server_factory):
    on = server_factory("--max-seqs", "4")
    off = server_factory("--max-seqs", "4", "--no-prefix-cache")
    try:
        c_on, c_off = on.client(), off.client()
        before, _ = on.metrics()
        answers_on = [ask(c_on, q) for q in ("What does os.path.join do?", "Name a json function.",
                                             "What does os.path.join do?")]
        after, text = on.metrics()
        assert "zse_prefix_cache_hit_tokens_total" in text
        queried = after["zse_prefix_cache_query_tokens_total"] - before["zse_prefix_cache_query_tokens_total"]
        hits = after["zse_prefix_cache_hit_tokens_total"] - before["zse_prefix_cache_hit_tokens_total"]
        # the system prompt is ~100 tokens: the second and third requests find its full blocks,
        # the third its whole question too
        assert hits >= 2 * 64, (hits, queried)
        assert queried >= hits
        assert after["zse_prefix_cache_blocks"] > 0
        answers_off = [ask(c_off, q) for q in ("What does os.path.join do?", "Name a json function.",
                                               "What does os.path.join do?")]
        assert answers_on == answers_off
        m_off, _ = off.metrics()
        assert m_off["zse_prefix_cache_hit_tokens_total"] == 0
        assert m_off["zse_prefix_cache_blocks"] == 0
        assert on.wait_idle()["zse_kv_blocks_used"] == 0
    finally:
        for s in (on, off):
            rc, log = s.close()
            assert rc == 0, log[-2000:]


def test_speculative_ngram_same_answers(server_factory):
    """--spec ngram: greedy answers equal a server without drafts; /metrics counts drafts"""
    spec = server_factory("--max-seqs", "4", "--spec", "ngram", "--spec-tokens", "6")
    plain = server_factory("--max-seqs", "4", "--no-prefix-cache")
    try:
        prompt = "def add(a, b):\n    return a + b\n\ndef add3(a, b, c):\n    return a + b + c\n\ndef add4("
        got = [spec.client().completions.create(model=MODEL_ID, prompt=prompt, max_tokens=40, temperature=0)
               .choices[0].text for _ in range(2)]
        want = plain.client().completions.create(model=MODEL_ID, prompt=prompt, max_tokens=40,
                                                  temperature=0).choices[0].text
        assert got == [want, want]
        m, text = spec.metrics()
        assert "zse_spec_draft_tokens_total" in text
        assert m["zse_spec_verify_passes_total"] > 0
        assert m["zse_spec_emitted_tokens_total"] == m["zse_spec_accepted_tokens_total"] + \
            m["zse_spec_verify_passes_total"]
    finally:
        for s in (spec, plain):
            rc, log = s.close()
            assert rc == 0, log[-2000:]


def test_speculative_bad_flags(zse_bin, model_path):
    import subprocess
    for args, msg in ((["--spec-tokens", "0", "--spec", "ngram"], "1 to 16"),
                      (["--spec-tokens", "17", "--spec", "ngram"], "1 to 16"),
                      (["--spec", "draft"], "--draft"),
                      (["--spec", "bogus"], "ngram or draft")):
        r = subprocess.run([str(zse_bin), "serve", str(model_path), "--port", "0", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    r = subprocess.run([str(zse_bin), "serve", str(model_path), "--port", "0", "--no-audit",
                        "--draft", "/etc/hostname"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--draft" in r.stderr and "not a .zse file" in r.stderr, r.stderr
