#!/usr/bin/env python3
"""Serving benchmark: aggregate generated tokens/s and time to first token at several
numbers of concurrent streaming clients, and the server's own cost per token against
`zse bench` on the same model.

    tools/bench_server.py --zse build/zse --model build/tiny-llama.zse [--clients 1,8,64]

Starts `zse serve` on a free loopback port, warms it up, then for each concurrency C starts
C clients at once; each streams one /v1/completions request of --gen-tokens tokens past
end-of-sequence (ignore_eos) from a --prompt-tokens prompt. The clients are asyncio over
raw sockets and do not parse JSON per token, so the figure is the server's, not Python's.

    aggregate tok/s  all completion tokens / (last response end - first request start)
    TTFT             request sent -> first token event, p50 and p99 over the clients
    overhead/token   (one client's whole streamed request, sent -> [DONE]) minus what zse bench
                     takes for the same work (prompt / prefill rate + tokens / decode rate, the
                     best of 3 runs), divided by the generated tokens: HTTP + JSON + SSE +
                     scheduling. Per-client inter-token rates are not used for it: SSE events
                     arrive in bursts when tokens come faster than the socket is read.

Prints one JSON object; --markdown prints the rows for docs/BENCHMARKS.md as well.
"""
import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_stream(port, body):
    """(seconds to the first token event, seconds to the end, completion tokens, decode seconds)"""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    first = None
    last_event = None
    tail = b""
    whole = bytearray()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        now = time.perf_counter()
        whole += chunk
        if first is None and b'"text"' in tail + chunk:
            first = now
        if b"data: " in tail + chunk:
            last_event = now
        tail = chunk[-16:]
    writer.close()
    end = time.perf_counter()
    text = whole.decode("utf-8", "replace")
    status = int(text.split(" ", 2)[1]) if text.startswith("HTTP/1.") else 0
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {text[:300]}")
    m = re.findall(r'"completion_tokens":(\d+)', text)
    tokens = int(m[-1]) if m else 0
    return (first or end) - t0, end - t0, tokens, (last_event or end) - (first or end)


async def run_level(port, clients, body):
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(port, body) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    tokens = sum(r[2] for r in results)
    decode_rates = [(r[2] - 1) / r[3] for r in results if r[3] > 0 and r[2] > 1]
    return {
        "clients": clients,
        "completion_tokens": tokens,
        "wall_s": round(wall, 5),
        "aggregate_tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
        "per_client_decode_tok_s": round(statistics.median(decode_rates), 1) if decode_rates else None,
    }


def start_server(args, tmp):
    log = open(os.path.join(tmp, "serve.log"), "wb")
    cmd = [args.zse, "serve", args.model, "--host", "127.0.0.1", "--port", "0", "--no-audit", "--quiet",
           "--max-seqs", str(max(args.clients)), "--max-queue", "1024", "--threads", str(args.threads),
           "--db", os.path.join(tmp, "zse.db"), *args.serve_arg]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    end = time.time() + 120
    while time.time() < end:
        text = open(os.path.join(tmp, "serve.log"), "rb").read().decode("utf-8", "replace")
        m = re.search(r"ready: .* on http://127\.0\.0\.1:(\d+)", text)
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            sys.exit(f"zse serve exited:\n{text}")
        time.sleep(0.05)
    proc.kill()
    sys.exit("zse serve did not become ready")


def zse_bench_once(args):
    out = subprocess.run([args.zse, "bench", args.model, "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
                          str(args.gen_tokens), "--threads", str(args.threads), "--json"],
                         check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def zse_bench(args):
    runs = [zse_bench_once(args) for _ in range(3)]
    best = min(runs, key=lambda b: args.prompt_tokens / b["prefill_tok_s"] + args.gen_tokens / b["decode_tok_s"])
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zse", default="build/zse")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per level; the best aggregate is kept")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra zse serve flag (repeatable)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--host-sampling", action="store_true",
                    help="add a negligible frequency penalty, which keeps sampling on the host (for comparison)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    # a prompt of exactly --prompt-tokens tokens: token ids, so no tokenizer is needed here
    body = {"model": os.path.basename(args.model)[:-4] if args.model.endswith(".zse") else args.model,
            "prompt": [100 + (i * 37) % 1500 for i in range(args.prompt_tokens)], "max_tokens": args.gen_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": 7, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.host_sampling:
        body["frequency_penalty"] = 1e-6
    bench = zse_bench(args)
    with tempfile.TemporaryDirectory(prefix="zse-bench-") as tmp:
        proc, port = start_server(args, tmp)
        try:
            asyncio.run(run_level(port, 2, body))  # warm-up
            levels = []
            for c in args.clients:
                runs = [asyncio.run(run_level(port, c, body)) for _ in range(max(args.repeat, 5) if c == 1 else args.repeat)]
                levels.append(max(runs, key=lambda r: r["aggregate_tok_s"]))
        finally:
            proc.terminate()
            proc.wait(60)
    single = next((lv for lv in levels if lv["clients"] == 1), None)
    overhead_us = None
    if single and single["completion_tokens"]:
        engine_s = args.prompt_tokens / bench["prefill_tok_s"] + args.gen_tokens / bench["decode_tok_s"]
        overhead_us = round((single["wall_s"] - engine_s) / single["completion_tokens"] * 1e6, 1)
    report = {"date": date.today().isoformat(), "machine": platform.node(), "model": args.model,
              "quant": bench.get("quant"), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "host_sampling": args.host_sampling, "zse_bench_decode_tok_s": bench["decode_tok_s"],
              "zse_bench_prefill_tok_s": bench["prefill_tok_s"], "levels": levels,
              "server_overhead_us_per_token": overhead_us}
    print(json.dumps(report, indent=2))
    if args.markdown:
        print()
        print("| clients | aggregate tok/s | TTFT p50 | TTFT p99 | per-client decode tok/s |")
        print("|---|---|---|---|---|")
        for lv in levels:
            print(f"| {lv['clients']} | {lv['aggregate_tok_s']} | {lv['ttft_p50_ms']} ms | {lv['ttft_p99_ms']} ms | "
                  f"{lv['per_client_decode_tok_s']} |")
        print(f"\nzse bench decode {bench['decode_tok_s']} tok/s; server overhead {overhead_us} µs/token")


if __name__ == "__main__":
    main()
