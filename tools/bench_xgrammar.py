#!/usr/bin/env python3
"""XGrammar's mask time on exactly the vocabulary and schema zse's grammar_sample --bench
measures, for docs/BENCHMARKS.md. Not a test; needs `pip install xgrammar` (which pulls
torch) in some virtual environment:

    build/grammar_sample TOKENIZER --dump-vocab /tmp/vocab.json [--vocab-size V --seed S]
    python3 tools/bench_xgrammar.py /tmp/vocab.json SCHEMA.json [-n 20] [--max-tokens 2000]

Outputs are drawn the same way (uniform over the allowed tokens, EOS included, until EOS or
the token limit); masks of the first output are "cold" (caches filling), the rest "warm";
times are this thread's CPU time around fill_next_token_bitmask (which includes the
Python-to-C++ call, a microsecond or so). Whitespace: any_whitespace=False (compact JSON,
as zse's one optional space is close to)."""
import argparse
import json
import random
import time

import numpy as np
import xgrammar as xgr


def pct(v, p):
    v = sorted(v)
    return v[int(p * (len(v) - 1) + 0.5)] if v else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("vocab")
    ap.add_argument("schema")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    voc = json.load(open(a.vocab))
    tokens = [bytes.fromhex(t) if t else b"" for t in voc["tokens"]]
    info = xgr.TokenizerInfo(tokens, vocab_type=xgr.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=voc["eos"])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    schema = open(a.schema).read()
    t0 = time.thread_time()
    cg = compiler.compile_json_schema(schema, any_whitespace=False)
    compile_ms = (time.thread_time() - t0) * 1e3
    rng = random.Random(a.seed)
    cold, warm, ended, total = [], [], 0, 0
    bitmask = xgr.allocate_token_bitmask(1, len(tokens))
    for k in range(a.n):
        m = xgr.GrammarMatcher(cg)
        for step in range(a.max_tokens):
            t = time.thread_time_ns()
            m.fill_next_token_bitmask(bitmask)
            dt = (time.thread_time_ns() - t) / 1e3
            (cold if k == 0 else warm).append(dt)
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: len(tokens)]
            allowed = np.flatnonzero(bits)
            pick = int(allowed[rng.randrange(len(allowed))])
            assert m.accept_token(pick), pick
            total += 1
            if m.is_terminated():
                ended += 1
                break
    print(json.dumps({"engine": "xgrammar " + getattr(xgr, "__version__", "?"), "vocab": len(tokens),
                      "compile_ms": round(compile_ms, 2), "outputs": a.n, "ended": ended, "tokens": total,
                      "cold_mask_us": {"p50": round(pct(cold, 0.5), 1), "p99": round(pct(cold, 0.99), 1),
                                       "max": round(max(cold), 1), "total_ms": round(sum(cold) / 1e3, 1)},
                      "warm_mask_us": {"p50": round(pct(warm, 0.5), 2), "p99": round(pct(warm, 0.99), 2),
                                       "max": round(max(warm) if warm else 0, 1),
                                       "mean": round(sum(warm) / len(warm), 2) if warm else 0}}))


if __name__ == "__main__":
    main()
