#!/usr/bin/env python3
"""Does batching change what a greedy request generates? Starts `zse serve`, sends each
prompt alone, then all of them --clients times over at once, and compares the texts.

    tools/check_batch_invariance.py --zse build/zse --model MODEL.zse [--device cuda]
        [--clients 64] [--max-tokens 32]

Prints one JSON object (mismatches listed with the first differing character) and exits 1
when any concurrent answer differs from the same request alone. Standard library only, so
it runs where the openai SDK is not installed (the GPU device).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(10):", "# read a file\n",
           "def fib(n):", "with open(path) as f:", "try:\n    x = int(s)\n"]


def complete(port, model, prompt, max_tokens):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["text"]


def start_server(args, tmp):
    log_path = os.path.join(tmp, "serve.log")
    cmd = [args.zse, "serve", args.model, "--port", "0", "--no-audit", "--quiet", "--db",
           os.path.join(tmp, "zse.db"), "--max-seqs", str(args.clients), "--max-queue", "1024"]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    end = time.time() + 300
    while time.time() < end:
        text = open(log_path, "rb").read().decode("utf-8", "replace")
        m = re.search(r"ready: .* on http://127\.0\.0\.1:(\d+)", text)
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            sys.exit(f"zse serve exited:\n{text}")
        time.sleep(0.05)
    proc.kill()
    sys.exit("zse serve did not become ready")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zse", default="build/zse")
    ap.add_argument("--model", required=True)
    ap.add_argument("--device")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    model = os.path.basename(args.model)
    model = model[:-4] if model.endswith(".zse") else model
    with tempfile.TemporaryDirectory(prefix="zse-inv-") as tmp:
        proc, port = start_server(args, tmp)
        try:
            alone = {p: complete(port, model, p, args.max_tokens) for p in PROMPTS}
            results = [None] * args.clients
            errors = []

            def worker(i):
                try:
                    results[i] = complete(port, model, PROMPTS[i % len(PROMPTS)], args.max_tokens)
                except Exception as e:  # reported below
                    errors.append(repr(e))

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            proc.terminate()
            proc.wait(60)
    mismatches = []
    for i, text in enumerate(results):
        want = alone[PROMPTS[i % len(PROMPTS)]]
        if text != want:
            at = next((k for k, (a, b) in enumerate(zip(text or "", want)) if a != b), min(len(text or ""), len(want)))
            mismatches.append({"client": i, "prompt": PROMPTS[i % len(PROMPTS)], "first_difference_at": at,
                               "alone": want, "batched": text})
    report = {"model": args.model, "device": args.device or "default", "clients": args.clients,
              "max_tokens": args.max_tokens, "errors": errors[:5], "n_errors": len(errors),
              "n_mismatches": len(mismatches), "mismatches": mismatches[:5]}
    print(json.dumps(report, indent=2))
    sys.exit(1 if errors or mismatches else 0)


if __name__ == "__main__":
    main()
