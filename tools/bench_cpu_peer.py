#!/usr/bin/env python3
"""zse against llama.cpp on the CPU, side by side, in one run on the same machine.

    tools/bench_cpu_peer.py --zse build/zse --llama-bench /path/to/llama.cpp/build/bin/llama-bench \\
        --pair int4=/tmp/m-int4.zse:/tmp/m-Q4_0.gguf --pair int8=/tmp/m-int8.zse:/tmp/m-Q8_0.gguf \\
        [--prompt-tokens 128] [--gen-tokens 32] [--threads 2] [--repeat 3] [--markdown]

Both files of a pair must hold the same weights (tools/synth_model.py writes the model;
`zse convert` makes the .zse; llama.cpp's convert_hf_to_gguf.py and llama-quantize make the
GGUF — build llama.cpp outside this repository, CPU only). The two programs run alternately,
--repeat times each, and the median of each figure is reported: prefill (prompt processing,
llama-bench "pp") and decode (generation, "tg") tokens/s at the same prompt and generation
lengths and thread count. llama-bench's own repetitions are set to 1 so both sides are
timed the same way.
"""
import argparse
import json
import platform
import statistics
import subprocess
from datetime import date


def run_zse(args, path):
    out = subprocess.run([args.zse, "bench", path, "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
                          str(args.gen_tokens), "--threads", str(args.threads), "--device", "cpu", "--json"],
                         check=True, capture_output=True, text=True, timeout=3600)
    b = json.loads(out.stdout.strip().splitlines()[-1])
    return b["prefill_tok_s"], b["decode_tok_s"], b.get("peak_rss_mb")


def run_llama(args, path):
    out = subprocess.run([args.llama_bench, "-m", path, "-p", str(args.prompt_tokens), "-n", str(args.gen_tokens),
                          "-t", str(args.threads), "-r", "1", "-o", "json"],
                         check=True, capture_output=True, text=True, timeout=3600)
    pp = tg = None
    for row in json.loads(out.stdout):
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            pp = row["avg_ts"]
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            tg = row["avg_ts"]
    if pp is None or tg is None:
        raise SystemExit(f"llama-bench gave no pp/tg rows for {path}:\n{out.stdout[:2000]}")
    return pp, tg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zse", default="build/zse")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--pair", action="append", required=True, help="NAME=FILE.zse:FILE.gguf (repeatable)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = []
    for spec in args.pair:
        name, files = spec.split("=", 1)
        zse_file, gguf = files.split(":", 1)
        z_pp, z_tg, l_pp, l_tg, rss = [], [], [], [], []
        for _ in range(args.repeat):
            pp, tg, mb = run_zse(args, zse_file)
            z_pp.append(pp), z_tg.append(tg), rss.append(mb)
            pp, tg = run_llama(args, gguf)
            l_pp.append(pp), l_tg.append(tg)
        row = {"name": name, "zse_file": zse_file, "gguf": gguf,
               "zse_prefill_tok_s": round(statistics.median(z_pp), 2),
               "zse_decode_tok_s": round(statistics.median(z_tg), 2),
               "llama_prefill_tok_s": round(statistics.median(l_pp), 2),
               "llama_decode_tok_s": round(statistics.median(l_tg), 2),
               "zse_peak_rss_mb": max(r for r in rss if r is not None) if any(rss) else None,
               "runs": {"zse_prefill": z_pp, "zse_decode": z_tg, "llama_prefill": l_pp, "llama_decode": l_tg}}
        row["decode_ratio"] = round(row["zse_decode_tok_s"] / row["llama_decode_tok_s"], 2)
        row["prefill_ratio"] = round(row["zse_prefill_tok_s"] / row["llama_prefill_tok_s"], 2)
        rows.append(row)
    report = {"date": date.today().isoformat(), "machine": platform.node(), "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeat": args.repeat,
              "rows": rows}
    print(json.dumps(report, indent=2))
    if args.markdown:
        print()
        print("| pair | zse prefill | llama.cpp prefill | ratio | zse decode | llama.cpp decode | ratio | zse peak RSS |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['zse_prefill_tok_s']} | {r['llama_prefill_tok_s']} | {r['prefill_ratio']}× | "
                  f"{r['zse_decode_tok_s']} | {r['llama_decode_tok_s']} | {r['decode_ratio']}× | "
                  f"{r['zse_peak_rss_mb']} MB |")


if __name__ == "__main__":
    main()
