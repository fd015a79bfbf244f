#!/usr/bin/env python3
"""zse convert of GGUF files written by the gguf Python package (tools/hf_to_gguf.py) from
the fixtures, checked against the same models converted from their safetensors.

  exact types    F32/F16/BF16 GGUF == HF --quant f32/f16/bf16 (the same logits, bit for bit);
                 Q8_0 GGUF == HF --quant int8g --group-size 32 (ggml's Q8_0 and zse's
                 int8g quantize alike); Q4_0/Q4_1/Q8_0 kept as int4s/int4/int8g decode to
                 exactly the values the gguf package decodes (portable kernels)
  other types    Q5_0, Q5_1 and the K-quants decode exactly as the package does (--quant
                 f32); the default conversion re-quantizes them (Q4_K: KL divergence
                 reported)
  metadata       vocabulary (token ids), chat template, format version, schemes
  errors         another architecture, an unsupported tensor type, a truncated file

usage: check_gguf.py ZSE_BIN ROOT WORKDIR    (ROOT: the repository)
"""
import json
import os
import struct
import subprocess
import sys

ZSE, ROOT, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, os.path.join(ROOT, "tools"))
import hf_to_gguf  # noqa: E402  (one process writes every GGUF: numpy and gguf load once)
PY = sys.executable
FIX = os.path.join(ROOT, "tests", "fixtures")
failures, checks = [], 0
PROMPT = "def fibonacci(n):\n    "


def run(args, env=None, check=True):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run(args, capture_output=True, text=True, env=e)
    if check and p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(args)}\n{p.stdout}\n{p.stderr}")
    return p


def expect(ok, what):
    global checks
    checks += 1
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def path(name):
    return os.path.join(WORK, name)


def gguf(src, name, qtype, dequant_dir=None, arch=None):
    out = path(name + ".gguf")
    hf_to_gguf.write_gguf(src, out, qtype, dequant_dir, arch)
    return out


def convert(src, name, *flags):
    out = path(name + ".zse")
    run([ZSE, "convert", src, "-o", out, "--force", *flags])
    return out


def header(zse_path):
    b = open(zse_path, "rb").read(1 << 22)
    n = struct.unpack("<Q", b[24:32])[0]
    return json.loads(b[64:64 + n])


def logits(model, kernels=None):
    out = model + ".logits"
    run([ZSE, "run", model, "-p", PROMPT, "-n", "1", "--temp", "0", "--device", "cpu", "--dump-logits", out],
        env={"ZSE_CPU_KERNELS": kernels} if kernels else None)
    return open(out).read()


def kld(model, base, kernels=None):
    p = run([ZSE, "perplexity", model, "-f", TEXT, "--ctx", "64", "--kld-base", base, "--json", "--device", "cpu"],
            env={"ZSE_CPU_KERNELS": kernels} if kernels else None)
    return json.loads(p.stdout)["mean_kld"]


def same_model(a, b, what, kernels=None):
    """the last prompt position's logits, printed so that they round-trip, are identical"""
    expect(logits(a, kernels) == logits(b, kernels), what)


def schemes(zse_path):
    return sorted({(t["scheme"], t["group_size"]) for t in header(zse_path)["tensors"] if t["shape"][0] > 1})


os.makedirs(WORK, exist_ok=True)
TEXT = path("eval-short.txt")
with open(TEXT, "w") as f:
    f.write(open(os.path.join(FIX, "eval.txt")).read()[:700])

# tiny-llama: llama's q/k row order and Llama-3 rope_freqs; tiny-qwen2: biases, tied
# embeddings, no reordering (the plain types and Q8_0 only, to keep the test short)
for fixture in ("tiny-llama", "tiny-qwen2"):
    src = os.path.join(FIX, fixture)
    llama = fixture == "tiny-llama"
    plain = ("f32", "f16", "bf16") if llama else ("f16",)
    ref = {q: convert(src, f"{fixture}-{q}", "--quant", q) for q in plain}
    for qtype, zq in (("F32", "f32"), ("F16", "f16"), ("BF16", "bf16")):
        if zq not in plain:
            continue
        z = convert(gguf(src, f"{fixture}-{qtype}", qtype), f"{fixture}-gguf-{qtype}")
        same_model(z, ref[zq], f"{fixture}: {qtype} GGUF == safetensors --quant {zq}")
    z = path(f"{fixture}-gguf-F16.zse")
    h, hr = header(z), header(ref["f16"])
    expect(h["chat_template"] == hr["chat_template"] and h["chat_template"], f"{fixture}: chat template carried over")
    expect(h["version"] == [1, 0] and h["quant"]["scheme"] == "gguf", f"{fixture}: F16 GGUF file is format 1.0")
    for text in ("Hello wörld  \n\tdef f(x): return x**2  # 12345", "<|im_start|>user\nhi<|im_end|><|eot_id|>"):
        a = run([ZSE, "tokenize", z, "--text", text, "--special"]).stdout
        b = run([ZSE, "tokenize", ref["f16"], "--text", text, "--special"]).stdout
        expect(a == b, f"{fixture}: token ids of {text[:12]!r}... equal")

    # Q8_0: kept as int8g g32, the same bytes zse's own int8g g32 writes from the safetensors
    q8 = convert(gguf(src, f"{fixture}-Q8_0", "Q8_0", path(f"{fixture}-Q8_0-ref")), f"{fixture}-gguf-Q8_0")
    expect(schemes(q8) == [("int8g", 32)] and header(q8)["version"] == [2, 0], f"{fixture}: Q8_0 → int8g g32, format 2.0")
    own = convert(src, f"{fixture}-int8g", "--quant", "int8g", "--group-size", "32", "--embed-quant", "int8g")
    same_model(q8, own, f"{fixture}: Q8_0 GGUF == safetensors --quant int8g --group-size 32")
    # Q4_0 / Q4_1 / Q8_0: kept exactly — the same numbers as the package's dequantization
    if not llama:
        continue
    for qtype, want in (("Q4_0", ("int4s", 32)), ("Q4_1", ("int4", 32)), ("Q8_0", ("int8g", 32))):
        refdir = path(f"{fixture}-{qtype}-ref")
        z = q8 if qtype == "Q8_0" else convert(gguf(src, f"{fixture}-{qtype}", qtype, refdir), f"{fixture}-gguf-{qtype}")
        expect(schemes(z) == [want], f"{fixture}: {qtype} kept as {want[0]} g{want[1]}")
        deq = convert(refdir, f"{fixture}-{qtype}-deq", "--quant", "f32")
        same_model(z, deq, f"{fixture}: {qtype} → {want[0]} decodes to the gguf package's values", "portable")

# Q5_0, Q5_1 (tiny-llama rows of 128 and 352) and the K-quants (rows of 256: a synthetic
# llama) decode exactly as the package decodes them; the default conversion re-quantizes
synth = path("synth-llama")
run([PY, os.path.join(ROOT, "tools", "synth_model.py"), "--arch", "llama", "--layers", "2", "--hidden", "256",
     "--ffn", "512", "--heads", "4", "--kv-heads", "2", "--vocab", "2048", "--seed", "3",
     "--tokenizer", os.path.join(FIX, "tiny-qwen2"), "--out", synth])
for src, qtypes in ((os.path.join(FIX, "tiny-llama"), ("Q5_0", "Q5_1")), (synth, ("Q4_K", "Q5_K", "Q6_K"))):
    for qtype in qtypes:
        name = f"{os.path.basename(src)}-{qtype}"
        g = gguf(src, name, qtype, path(name + "-ref"))
        exact = convert(g, name + "-f32", "--quant", "f32")
        same_model(exact, convert(path(name + "-ref"), name + "-deq", "--quant", "f32"),
                   f"{name}: decoded values == the gguf package's", "portable")
        auto = convert(g, name + "-auto")
        want = [("int4", 32)] if qtype == "Q4_K" else [("int8g", 32)]
        expect(schemes(auto) == want, f"{name}: the default conversion re-quantizes to {want[0][0]} g32")
        if qtype == "Q4_K":
            d = kld(auto, exact)
            print(f"     {name}: KL divergence of the {want[0][0]} g32 file from the GGUF's values: {d:.8f}")
            expect(0 < d < 0.01, f"{name}: KL divergence small and not zero")
            z = convert(g, name + "-int8", "--quant", "int8")
            expect(schemes(z) == [("int8", 0)], f"{name}: --quant int8 applies to every weight")

# errors: clear messages that name the problem, nothing written
src = os.path.join(FIX, "tiny-qwen2")
phi3 = gguf(src, "bad-arch", "Q8_0", arch="phi3")
# an IQ2_XXS tensor (GGML type 16): the type id of blk.1.ffn_up.weight patched in the header
raw = bytearray(open(path("tiny-qwen2-Q8_0.gguf"), "rb").read())
name = b"blk.1.ffn_up.weight"
at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
n_dims = struct.unpack_from("<I", raw, at)[0]
struct.pack_into("<I", raw, at + 4 + 8 * n_dims, 16)
iq2 = path("bad-type.gguf")
open(iq2, "wb").write(raw)
for g, needle in ((phi3, "architecture 'phi3' is not supported"),
                  (iq2, "tensor 'blk.1.ffn_up.weight' has GGML type IQ2_XXS")):
    out = path("bad.zse")
    p = run([ZSE, "convert", g, "-o", out, "--force"], check=False)
    expect(p.returncode != 0 and needle in p.stderr and not os.path.exists(out), f"error names it: {needle}")
p = run([ZSE, "serve", path("tiny-qwen2-Q8_0.gguf")], check=False)
expect(p.returncode != 0 and "is a GGUF file; zse serves .zse files. Convert it first" in p.stderr,
       "zse serve of a GGUF says to convert it first")
whole = open(path("tiny-qwen2-Q8_0.gguf"), "rb").read()
for cut in (len(whole) - 1000, 4000, 30):
    with open(path("cut.gguf"), "wb") as f:
        f.write(whole[:cut])
    p = run([ZSE, "convert", path("cut.gguf"), "-o", path("bad.zse"), "--force"], check=False)
    expect(p.returncode != 0 and ("past the end" in p.stderr or "truncated" in p.stderr) and
           not os.path.exists(path("bad.zse")), f"a GGUF cut at {cut} bytes is refused as truncated")

print(f"{checks - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
