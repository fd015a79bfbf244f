#!/usr/bin/env python3
"""tools/synth_model.py --zse-direct against zse convert: the same shape written both ways
(a bf16 directory converted, and the .zse written directly) must have the same header but
for provenance, offsets and checksums — config, tokenizer, recipe, every tensor's name,
scheme, layout, shape, group size and size, every expert bank's layout — and the direct file
must verify (every checksum) and generate.

    check_synth_direct.py ZSE WORKDIR QUANT SHAPE-ARGS...      (exits 77 without numpy)
"""
import json
import os
import shutil
import struct
import subprocess
import sys

try:
    import numpy  # noqa: F401  (synth_model.py needs it)
except ImportError:
    print("numpy missing: skipped")
    sys.exit(77)

zse, work, quant, shape = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
synth = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "synth_model.py")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
hf, conv, direct = os.path.join(work, "hf"), os.path.join(work, "conv.zse"), os.path.join(work, "direct.zse")


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)}: {r.stderr.strip()[-800:]}")
    return r.stdout


run(sys.executable, synth, *shape, "--out", hf)
run(zse, "convert", hf, "-o", conv, "--quant", quant, "--force")
run(sys.executable, synth, *shape, "--zse-direct", direct, "--quant", quant)


def header(path):
    with open(path, "rb") as f:
        pre = f.read(64)
        n = struct.unpack("<Q", pre[24:32])[0]
        return json.loads(f.read(n))


a, b = header(conv), header(direct)
bad = []
for key in ("format", "version", "config", "tokenizer_config", "tokenizer_type", "chat_template", "generation", "quant"):
    if a.get(key) != b.get(key):
        bad.append(f"{key}: convert {json.dumps(a.get(key))[:300]} vs direct {json.dumps(b.get(key))[:300]}")
fields = ("name", "scheme", "layout", "shape", "group_size", "size")
ta = [{k: t[k] for k in fields} for t in a["tensors"]]
tb = [{k: t[k] for k in fields} for t in b["tensors"]]
if ta != tb:
    diff = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    bad.append(f"tensors: {len(ta)} vs {len(tb)}, first difference at {diff}: "
               f"{ta[diff] if diff < len(ta) else None} vs {tb[diff] if diff < len(tb) else None}")
ea = [{k: e[k] for k in ("layer", "count", "stride", "size", "parts")} for e in a.get("experts", [])]
eb = [{k: e[k] for k in ("layer", "count", "stride", "size", "parts")} for e in b.get("experts", [])]
if ea != eb:
    bad.append(f"expert banks differ: {json.dumps(ea)[:400]} vs {json.dumps(eb)[:400]}")
if b["blobs"] != a["blobs"] and (b["blobs"]["tokenizer.json"]["checksum"] != a["blobs"]["tokenizer.json"]["checksum"]):
    bad.append("the tokenizer blob differs")
if bad:
    print("\n".join(bad))
    sys.exit(1)
print(run(zse, "verify", direct).strip())
ids = run(zse, "run", direct, "-p", "def main():", "-n", "6", "--temp", "0", "--ids", "--device", "cpu")
print(f"direct file: header as convert's ({len(tb)} tensors, {len(eb)} banks), verified, generated {ids.strip()}")
