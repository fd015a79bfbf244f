"""The prefix cache through `zse serve`: a long system prompt sent twice is found the second
time (/metrics counts the hit tokens), answers are the same as a server started with
--no-prefix-cache, and that server's counters stay at zero."""
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
