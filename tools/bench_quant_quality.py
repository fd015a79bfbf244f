#!/usr/bin/env python3
"""KL divergence of zse's 4-bit recipes (round to nearest, calibrated, calibrated within a bit
budget) and of llama.cpp's Q4_0 / Q4_K_M from the float model, on the same weights, text
and context: the quality table of docs/BENCHMARKS.md (docs/QUANT.md explains the method).

    python3 tools/bench_quant_quality.py --zse build-rel/zse \\
        --model tiny-llama=tests/fixtures/tiny-llama --model tiny-qwen2=tests/fixtures/tiny-qwen2 \\
        --calib tests/fixtures/calib.txt --eval tests/fixtures/eval.txt --ctx 256 \\
        [--llama-src DIR --llama-bin DIR --llama-python PY [--llama-imatrix]] --work /tmp/qq --markdown

zse side: `zse convert --quant f32` is the reference; every other file is scored with
`zse perplexity FILE -f EVAL --ctx N --kld-base REF --json`. llama.cpp side (when
--llama-bin is given): the model directory is copied and converted with llama.cpp's
convert_hf_to_gguf.py (--outtype f32), quantized with llama-quantize, and scored with
llama-perplexity --kl-divergence-base / --kl-divergence at the same context, without a BOS
token (zse's perplexity adds none). The copy gets three adaptations older llama.cpp
converters need for directories written by transformers 5, none of which changes a weight:
tokenizer_config's tokenizer_class becomes PreTrainedTokenizerFast, config.json's
rope_parameters go back to rope_theta / rope_scaling (and original_max_position_embeddings
to the top level, where that converter reads it), and the BPE pre-tokenizer is named with
--llama-pre NAME=PRE (llama-bpe, qwen2, ...) since a locally trained tokenizer's hash is in
no list (the converter copy must honour the ZSE_PRE variable; see docs/BENCHMARKS.md).
Sizes: weight bytes are the tensors' bytes (no tokenizer, header or alignment); bits per
weight divide them by the parameters."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def zse_info(zse, path):
    return json.loads(run([zse, "info", path, "--json"]))


def zse_kld(zse, path, ref, text, ctx):
    out = json.loads(run([zse, "perplexity", path, "-f", text, "--ctx", str(ctx), "--kld-base", ref, "--json"]))
    return out["mean_kld"], out["perplexity"]


def zse_rows(a, name, src, work):
    ref = os.path.join(work, f"{name}-f32.zse")
    run([a.zse, "convert", src, "-o", ref, "--quant", "f32", "--force"])
    recipes = [
        ("zse int4 g128, round to nearest", ["--quant", "int4"]),
        ("zse int4s g128, round to nearest", ["--quant", "int4s"]),
        ("zse int4 g128, calibrated", ["--quant", "int4", "--calibrate", a.calib]),
        ("zse int4s g128, calibrated", ["--quant", "int4s", "--calibrate", a.calib]),
        (f"zse int4, calibrated, --target-bpw {a.target_bpw}",
         ["--quant", "int4", "--calibrate", a.calib, "--target-bpw", str(a.target_bpw)]),
    ]
    rows = []
    for i, (label, flags) in enumerate(recipes):
        path = os.path.join(work, f"{name}-{i}.zse")
        run([a.zse, "convert", src, "-o", path, "--force"] + flags)
        info = zse_info(a.zse, path)
        kld, ppl = zse_kld(a.zse, path, ref, a.eval, a.ctx)
        rows.append((label, kld, ppl, info["weight_bytes"], info["parameters"], os.path.getsize(path)))
    return rows


def zse_at_bytes(a, name, src, bytes_goal, work):
    """calibrated int4 with the --target-bpw that makes its weight bytes Q4_K_M's: the
    budget covers the planned tensors, the rest (embedding, norms) is what it is"""
    probe = os.path.join(work, f"{name}-2.zse")  # the calibrated int4 file of zse_rows
    info = zse_info(a.zse, probe)
    cal = info["calibration"]["tensors"]
    planned_bytes = sum(zse_tensor(probe, t["name"])["size"] for t in cal)
    elems = sum(zse_tensor(probe, t["name"])["elements"] for t in cal)
    target = 8 * (bytes_goal - (info["weight_bytes"] - planned_bytes)) / elems
    target = int(target * 1000) / 1000  # round down: stay at or under the goal
    path = os.path.join(work, f"{name}-atq4km.zse")
    run([a.zse, "convert", src, "-o", path, "--force", "--quant", "int4", "--calibrate", a.calib,
         "--target-bpw", str(target)])
    info = zse_info(a.zse, path)
    kld, ppl = zse_kld(a.zse, path, os.path.join(work, f"{name}-f32.zse"), a.eval, a.ctx)
    return (f"zse int4, calibrated, --target-bpw {target} (Q4_K_M's weight bytes)", kld, ppl,
            info["weight_bytes"], info["parameters"], os.path.getsize(path))


_headers = {}


def zse_tensor(path, tensor):
    """a tensor's size and elements, from the .zse file's header"""
    if path not in _headers:
        with open(path, "rb") as f:
            pre = f.read(64)
            header = json.loads(f.read(int.from_bytes(pre[24:32], "little")))
        _headers[path] = {t["name"]: {"size": t["size"], "elements": t["shape"][0] * t["shape"][1]}
                          for t in header["tensors"]}
    return _headers[path][tensor]


def hf_copy_for_llama(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for root, _, files in os.walk(dst):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    tc = os.path.join(dst, "tokenizer_config.json")
    if os.path.exists(tc):
        c = json.load(open(tc))
        c["tokenizer_class"] = "PreTrainedTokenizerFast"
        json.dump(c, open(tc, "w"), indent=1)
    cp = os.path.join(dst, "config.json")
    c = json.load(open(cp))
    rp = c.pop("rope_parameters", None)
    if rp:
        c["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            c["rope_scaling"] = rp
            if "original_max_position_embeddings" in rp:
                c["original_max_position_embeddings"] = rp["original_max_position_embeddings"]
    json.dump(c, open(cp, "w"), indent=1)


def gguf_sizes(a, path):
    code = ("import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); "
            "print(sum(int(t.n_bytes) for t in r.tensors), "
            "sum(int(t.n_elements) for t in r.tensors if not t.name.startswith('rope_freqs')))")
    env = dict(os.environ, PYTHONPATH=os.path.join(a.llama_src, "gguf-py"))
    b, n = run([a.llama_python, "-c", code, path], env=env).split()
    return int(b), int(n)


def llama_rows(a, name, src, pre, work):
    hf = os.path.join(work, f"{name}-hf")
    hf_copy_for_llama(src, hf)
    f32 = os.path.join(work, f"{name}-f32.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(a.llama_src, "gguf-py"), ZSE_PRE=pre)
    run([a.llama_python, os.path.join(a.llama_src, "convert_hf_to_gguf.py"), hf, "--outtype", "f32",
         "--outfile", f32], env=env)
    ppl_bin = os.path.join(a.llama_bin, "llama-perplexity")
    common = ["-c", str(a.ctx), "-b", str(a.ctx), "-t", str(a.threads),
              "--override-kv", "tokenizer.ggml.add_bos_token=bool:false"]
    base = os.path.join(work, f"{name}.kld")
    run([ppl_bin, "-m", f32, "-f", a.eval, "--kl-divergence-base", base] + common)
    rows = []
    kinds = [("Q4_0", None), ("Q4_K_M", None)]
    if a.llama_imatrix:
        # llama.cpp's own calibration: an importance matrix from the same calibration text
        imat = os.path.join(work, f"{name}.imatrix")
        run([os.path.join(a.llama_bin, "llama-imatrix"), "-m", f32, "-f", a.calib, "-o", imat, "-c", "512",
             "-t", str(a.threads), "--override-kv", "tokenizer.ggml.add_bos_token=bool:false"])
        kinds += [("Q4_0", imat), ("Q4_K_M", imat)]
    for q, imat in kinds:
        tag = q + ("-imatrix" if imat else "")
        path = os.path.join(work, f"{name}-{tag}.gguf")
        run([os.path.join(a.llama_bin, "llama-quantize")] + (["--imatrix", imat] if imat else []) +
            [f32, path, q, str(a.threads)])
        out = run([ppl_bin, "-m", path, "--kl-divergence-base", base, "--kl-divergence"] + common)
        kld = float(re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", out).group(1))
        ppl = float(re.search(r"Mean PPL\(Q\)\s+:\s+([0-9.eE+-]+)", out).group(1))
        b, n = gguf_sizes(a, path)
        rows.append((f"llama.cpp {q}" + (" (imatrix from the calibration text)" if imat else ""), kld, ppl, b, n,
                     os.path.getsize(path)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zse", required=True)
    p.add_argument("--model", action="append", required=True, help="NAME=DIR (a Hugging Face directory)")
    p.add_argument("--llama-pre", action="append", default=[], help="NAME=PRE: llama.cpp pre-tokenizer of NAME")
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--target-bpw", type=float, default=4.5)
    p.add_argument("--llama-src", help="llama.cpp source (convert_hf_to_gguf.py, gguf-py)")
    p.add_argument("--llama-bin", help="llama.cpp binaries (llama-quantize, llama-perplexity)")
    p.add_argument("--llama-python", default=sys.executable, help="a Python with torch and transformers")
    p.add_argument("--llama-imatrix", action="store_true",
                   help="also Q4_0 / Q4_K_M with an importance matrix from the calibration text (llama-imatrix)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", required=True)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    pres = dict(x.split("=", 1) for x in a.llama_pre)
    results = []
    for m in a.model:
        name, src = m.split("=", 1)
        rows = zse_rows(a, name, src, a.work)
        if a.llama_bin:
            llama = llama_rows(a, name, src, pres.get(name, "llama-bpe"), a.work)
            rows += llama
            k_m = next(r for r in llama if r[0] == "llama.cpp Q4_K_M")
            rows.append(zse_at_bytes(a, name, src, k_m[3], a.work))
        results.append((name, rows))
    for name, rows in results:
        if a.markdown:
            print(f"\n**{name}**\n")
            print("| file | mean KL divergence | perplexity | weight bytes | bits/weight | file bytes |")
            print("|---|---|---|---|---|---|")
        for label, kld, ppl, b, n, size in rows:
            if a.markdown:
                print(f"| {label} | {kld:.6f} | {ppl:.3f} | {b:,} | {8 * b / n:.3f} | {size:,} |")
            else:
                print(f"{name}\t{label}\t{kld:.6f}\t{ppl:.3f}\t{b}\t{8 * b / n:.3f}\t{size}")


if __name__ == "__main__":
    main()
