#!/usr/bin/env python3
"""Golden test: convert a fixture, run `zse run` and compare with Hugging Face.

    check_generation.py ZSE FIXTURE_DIR WORK_DIR SCHEME [--kv int8] [--close N] [--max-err E]

For every prompt in FIXTURE_DIR/goldens.json: the last-position logits from --dump-logits
match HF's (max |diff| <= 1e-3 x max |logit| for f32/bf16 files), the argmax at every
prompt position (--dump-argmax) matches, and the 48-token greedy continuation is identical. For quantized files, --close N requires the first N greedy
tokens to match and --max-err E bounds the logit error (relative to the largest logit). Standard library only (CI has no numpy).
"""
import json, os, subprocess, sys

zse, fixture, work, scheme = sys.argv[1:5]
opts = sys.argv[5:]
kv = opts[opts.index("--kv") + 1] if "--kv" in opts else "f16"
close = int(opts[opts.index("--close") + 1]) if "--close" in opts else None
max_err = float(opts[opts.index("--max-err") + 1]) if "--max-err" in opts else 1e-3
if not os.path.isdir(fixture):
    print(f"skipped: {fixture} is absent")
    sys.exit(77)
os.makedirs(work, exist_ok=True)
name = os.path.basename(fixture.rstrip("/"))
model = os.path.join(work, f"{name}-{scheme}.zse")
subprocess.run([zse, "convert", fixture, "-o", model, "--quant", scheme, "--force"], check=True,
               stderr=subprocess.DEVNULL)
g = json.load(open(os.path.join(fixture, "goldens.json")))
failures = checked = 0
for case in g["logits"]:
    dump = os.path.join(work, f"{name}-{scheme}-logits.json")
    dump_am = os.path.join(work, f"{name}-{scheme}-argmax.json")
    r = subprocess.run([zse, "run", model, "-p", case["prompt"], "--temp", "0", "-n", str(len(case["greedy_48"])),
                        "--ids", "--ignore-eos", "--kv-cache", kv, "--dump-logits", dump, "--dump-argmax", dump_am,
                        "--threads", "2"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL {name} {scheme}: zse run failed: {r.stderr}")
        failures += 1
        continue
    got = json.loads(r.stdout)
    logits = json.load(open(dump))
    want = case["last_logits"]
    scale = max(abs(v) for v in want)
    err = max(abs(a - b) for a, b in zip(logits, want)) / scale
    want_ids = case["greedy_48"]
    n_same = next((i for i, (a, b) in enumerate(zip(got, want_ids)) if a != b), min(len(got), len(want_ids)))
    checked += 1
    argmax = json.load(open(dump_am))
    want_am = case.get("argmax_per_position", argmax)
    am_same = sum(a == b for a, b in zip(argmax, want_am))
    if close is None:
        ok = err <= max_err and got == want_ids and len(logits) == len(want) and argmax == want_am
    else:  # quantized: logits near HF's, and the greedy text agrees for a while
        ok = err <= max_err and n_same >= close and len(logits) == len(want)
    print(f"{'ok  ' if ok else 'FAIL'} {name} {scheme} kv={kv} prompt={case['prompt']!r}: "
          f"logit error {err:.2e} (relative to max), argmax {am_same}/{len(want_am)} positions, "
          f"greedy match {n_same}/{len(want_ids)}")
    failures += not ok
print(f"{checked - failures} passed, {failures} failed")
sys.exit(1 if failures or checked == 0 else 0)
