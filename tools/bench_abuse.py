#!/usr/bin/env python3
"""What abusive clients cost the legitimate ones: `zse serve` under each attack of issue 22.

    tools/bench_abuse.py --zse build-rel/zse --model tiny-qwen2.zse [--seconds 20] [--attacks all]
                         [--serve-args "--max-seqs-per-key 4"] [--markdown]

Starts `zse serve --auth` on a free loopback port with keys for four legitimate clients, an
attacker key and a hog key. Legitimate traffic: four clients (one key each, 127.0.0.1),
each looping non-streaming /v1/completions of --gen-tokens tokens past end-of-sequence,
plus a /health probe every 20 ms. It runs alone (the baseline), then beside each attack:

    slowloris   1,000 connections from 127.0.0.2-11 (100 each), each sending a header line
                every 10 s and reconnecting when closed
    slow-body   100 keyed uploads of a 1 MB body at one byte a second
    uploads     1,000 unauthenticated 4 MB uploads from 127.0.0.6, 50 at a time (server RSS)
    flood       4 loops of pipelined unauthenticated 404/401s from 127.0.0.2
    big-bodies  8 keyed clients posting 4 MB prompts back to back
    hog         a key with 4 streaming requests of n=16, max_tokens=1900 it never reads

and reports, per attack, the legitimate clients' aggregate completion tokens/s beside it
and in a baseline phase run right before it (the ratio of the two: on a shared machine the
load drifts, so each attack is compared with its own neighbour; --repeats N takes the median
of N such pairs), and /health p50/p99 under the attack. Client-side work is asyncio over raw
sockets; the attack runs in a process of its own at nice 10, so on a small machine the
attacker's own Python does not take the CPU the server's clients are measured with (a real
attacker is not on the server's machine). Prints one JSON object; --markdown prints table
rows as well.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date

LEGIT = 4


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_key(zse, db, name, *extra):
    out = subprocess.run([zse, "api-key", "create", name, *extra, "--db", db], capture_output=True, check=True)
    return out.stdout.decode().strip()


async def request(port, head_and_body, source="127.0.0.1", read=True):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(head_and_body)
        await writer.drain()
        return await reader.read() if read else b""
    finally:
        writer.close()


def post(path, body, key=None, extra=b""):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n" if key else b""
    return (b"POST " + path + b" HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n" + auth + extra +
            b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


# ---- legitimate traffic ---------------------------------------------------------------------

async def legit_client(port, key, model, gen, stop, tokens):
    body = post(b"/v1/completions", {"model": model, "prompt": "def main():", "max_tokens": gen,
                                     "ignore_eos": True, "temperature": 0}, key)
    while not stop.is_set():
        reply = await request(port, body)
        m = re.search(rb'"completion_tokens":(\d+)', reply)
        if m and not stop.is_set():
            tokens.append(int(m.group(1)))


async def health_probe(port, stop, waits):
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            reply = await asyncio.wait_for(request(port, b"GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"),
                                           10)
            ok = reply.startswith(b"HTTP/1.1 200")
        except (OSError, asyncio.TimeoutError):
            ok = False
        waits.append(time.perf_counter() - t0 if ok else float("inf"))
        await asyncio.sleep(0.02)


# ---- attacks ----------------------------------------------------------------------------------

async def slowloris(port, stop, _):
    async def one(source):
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
                writer.write(b"GET /health HTTP/1.1\r\n")
                while not stop.is_set():
                    await asyncio.sleep(10)
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
            except OSError:
                await asyncio.sleep(0.5)
    await asyncio.gather(*(one(f"127.0.0.{2 + i % 10}") for i in range(1000)))


async def slow_body(port, stop, keys):
    async def one():
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer " +
                             keys["attacker"].encode() + b"\r\nContent-Length: 1048576\r\n\r\n{")
                while not stop.is_set():
                    await asyncio.sleep(1)
                    writer.write(b" ")
                    await writer.drain()
            except OSError:
                await asyncio.sleep(0.5)
    await asyncio.gather(*(one() for _ in range(100)))


async def uploads(port, stop, state):
    head = post(b"/v1/chat/completions", b"", extra=b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: 4194304")
    chunk = b" " * 65536

    async def one():
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.6", 0))
            writer.write(head + chunk)
            await writer.drain()
            answer = await reader.read(64)
            state["401"] += answer.startswith(b"HTTP/1.1 401")
            for _ in range(63):  # the rest of the 4 MB, until the server has closed
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            if writer:
                writer.close()
        state["uploads"] += 1

    sem = asyncio.Semaphore(50)

    async def limited():
        async with sem:
            await one()
    await asyncio.gather(*(limited() for _ in range(1000)))
    state["done"] = True


async def flood(port, stop, _):
    batch = b"".join(b"GET /nope HTTP/1.1\r\nHost: b\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: b\r\n\r\n"
                     for _ in range(50))

    async def one():
        while not stop.is_set():
            try:
                await asyncio.wait_for(request(port, batch, "127.0.0.2"), 5)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)
    await asyncio.gather(*(one() for _ in range(4)))


async def big_bodies(port, stop, keys):
    body = post(b"/v1/completions", {"model": "m", "prompt": " " * ((4 << 20) - 200)}, keys["attacker"])

    async def one():
        while not stop.is_set():
            try:
                await request(port, body, "127.0.0.4")
            except OSError:
                await asyncio.sleep(0.1)
    await asyncio.gather(*(one() for _ in range(8)))


async def hog(port, stop, keys, model):
    body = post(b"/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], "n": 16,
                                          "max_tokens": 1900, "ignore_eos": True, "stream": True}, keys["hog"])
    writers = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.5", 0))
        writer.write(body)
        writers.append(writer)
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for w in writers:
        w.close()


# ---- phases -------------------------------------------------------------------------------------

ATTACKS = {"slowloris": slowloris, "slow-body": slow_body, "uploads": uploads, "flood": flood,
           "big-bodies": big_bodies, "hog": hog}


def attacker_main(name, port, keys, model, ready, done, state):
    """the attack, in a process of its own at a lower priority"""
    os.nice(10)

    async def run():
        stop = asyncio.Event()
        st = {"401": 0, "uploads": 0, "done": False}
        fn = ATTACKS[name]
        task = asyncio.create_task(fn(port, stop, keys, model) if name == "hog" else
                                   fn(port, stop, st) if name == "uploads" else fn(port, stop, keys))
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.1)
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        state.update(st)
    asyncio.run(run())


async def measure(port, keys, model, args, pid, seconds):
    """the legitimate clients' tokens/s, /health latencies and the server's peak RSS"""
    stop = asyncio.Event()
    tokens, waits = [], []
    legit = [asyncio.create_task(legit_client(port, keys[f"legit-{i}"], model, args.gen_tokens, stop, tokens))
             for i in range(LEGIT)]
    probe = asyncio.create_task(health_probe(port, stop, waits))
    t0 = time.perf_counter()
    peak = 0.0
    while time.perf_counter() - t0 < seconds:
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.25)
    elapsed = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*legit, probe, return_exceptions=True)
    return sum(tokens) / elapsed, waits, peak


def phase(port, keys, model, args, attack, pid):
    """a baseline, then the same measurement beside the attack"""
    base_tok, _, _ = asyncio.run(measure(port, keys, model, args, pid, args.seconds))
    rss0 = rss_mb(pid)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    state = ctx.Manager().dict()
    proc = ctx.Process(target=attacker_main, args=(attack, port, keys, model, ready, done, state))
    proc.start()
    ready.wait(30)
    time.sleep(2)  # the attack in place first
    tok, waits, peak = asyncio.run(measure(port, keys, model, args, pid, args.seconds))
    done.set()
    proc.join(60)
    out = {"attack": attack, "baseline_tok_s": round(base_tok, 1), "legit_tok_s": round(tok, 1),
           "ratio": round(tok / base_tok, 3) if base_tok else None,
           "health_p50_ms": round(percentile(waits, 50) * 1000, 2), "health_p99_ms": round(percentile(waits, 99) * 1000, 2),
           "health_failed": sum(w == float("inf") for w in waits), "probes": len(waits)}
    if attack == "uploads":
        out.update(rss_before_mb=round(rss0, 1), rss_peak_mb=round(peak, 1), uploads=state.get("uploads", 0),
                   uploads_401=state.get("401", 0))
    time.sleep(3)  # the server settles (closed connections, cancelled sequences)
    return out


def wait_ready(port, proc, seconds=120):
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"zse serve exited ({proc.returncode})")
        try:
            reply = asyncio.run(request(port, b"GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"))
            if reply.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("zse serve did not become ready")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zse", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attacks", default="all")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    attacks = ["slowloris", "slow-body", "uploads", "flood", "big-bodies", "hog"]
    if args.attacks != "all":
        attacks = args.attacks.split(",")
    tmp = tempfile.TemporaryDirectory(prefix="zse-abuse-")
    db = os.path.join(tmp.name, "zse.db")
    keys = {f"legit-{i}": make_key(args.zse, db, f"legit-{i}") for i in range(LEGIT)}
    keys["attacker"] = make_key(args.zse, db, "attacker")
    keys["hog"] = make_key(args.zse, db, "hog")
    log = open(os.path.join(tmp.name, "serve.log"), "wb")
    proc = subprocess.Popen([args.zse, "serve", args.model, "--port", "0", "--auth", "--db", db, "--quiet",
                             "--threads", str(args.threads), *args.serve_args.split()], stdout=log,
                            stderr=subprocess.STDOUT)
    port = None
    for _ in range(600):
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", open(log.name).read())
        if m:
            port = int(m.group(1))
            break
        time.sleep(0.05)
    if not port:
        sys.exit("zse serve did not start:\n" + open(log.name).read())
    wait_ready(port, proc)
    model = re.search(r"ready: (\S+)", open(log.name).read()).group(1)
    results = []
    try:
        for a in attacks:
            runs = [phase(port, keys, model, args, a, proc.pid) for _ in range(args.repeats)]
            runs.sort(key=lambda r: r["ratio"] or 0)
            best = dict(runs[len(runs) // 2])  # the median pair
            best["ratios"] = [r["ratio"] for r in runs]
            results.append(best)
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
              "load_average": os.getloadavg(), "model": os.path.basename(args.model), "seconds": args.seconds,
              "gen_tokens": args.gen_tokens, "serve_args": args.serve_args, "phases": results}
    print(json.dumps(report, indent=2))
    if args.markdown:
        print("\n| attack | legit tok/s without / with | ratio (median of runs) | /health p50 | /health p99 | "
              "failed probes | notes |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            notes = ""
            if r["attack"] == "uploads":
                notes = (f"RSS {r['rss_before_mb']} -> {r['rss_peak_mb']} MB (peak) over {r['uploads']} uploads, "
                         f"{r['uploads_401']} answered 401")
            print(f"| {r['attack']} | {r['baseline_tok_s']:,} / {r['legit_tok_s']:,} | {r['ratio']} "
                  f"({', '.join(str(x) for x in r['ratios'])}) | {r['health_p50_ms']} ms | {r['health_p99_ms']} ms | "
                  f"{r['health_failed']}/{r['probes']} | {notes} |")


if __name__ == "__main__":
    main()
