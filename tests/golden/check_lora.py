#!/usr/bin/env python3
"""LoRA goldens: `zse run --lora` against PEFT (tests/fixtures/lora, tools/make_lora_fixtures.py).

    check_lora.py ZSE FIXTURES WORK_DIR

For each base fixture (converted at f32) and each of its adapters, as the PEFT directory
(every prompt) and as a .zsa file from `zse convert-adapter --base` (the first): the last-position logits
of each prompt within 1e-3 of PEFT's (max |diff| relative to max |logit|) and the 24-token
greedy continuation identical; the base model alone matches PEFT with the adapter disabled.
--lora-scale 0 gives the base model's logits exactly. Standard library only.
"""
import json, os, subprocess, sys

zse, fixtures, work = sys.argv[1:4]
lora = os.path.join(fixtures, "lora")
if not os.path.isfile(os.path.join(lora, "goldens.json")):
    print(f"skipped: {lora}/goldens.json is absent")
    sys.exit(77)
os.makedirs(work, exist_ok=True)
g = json.load(open(os.path.join(lora, "goldens.json")))
failures = checked = 0


def run(model, prompt, adapter=None, extra=()):
    dump = os.path.join(work, "logits.json")
    cmd = [zse, "run", model, "-p", prompt, "--temp", "0", "-n", "24", "--ids", "--ignore-eos", "--threads", "2",
           "--dump-logits", dump, *extra]
    if adapter:
        cmd += ["--lora", adapter]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None, None, r.stderr.strip()
    return json.loads(r.stdout), json.load(open(dump)), None


def check(label, got, logits, case):
    global failures, checked
    want = case["last_logits"]
    err = max(abs(a - b) for a, b in zip(logits, want)) / max(abs(v) for v in want)
    ok = err <= 1e-3 and got == case["greedy"] and len(logits) == len(want)
    n_same = next((i for i, (a, b) in enumerate(zip(got, case["greedy"])) if a != b), len(got))
    print(f"{'ok  ' if ok else 'FAIL'} {label}: logit error {err:.2e}, greedy {n_same}/{len(case['greedy'])}")
    checked += 1
    failures += not ok


for base, gb in g.items():
    model = os.path.join(work, f"{base}-f32.zse")
    subprocess.run([zse, "convert", os.path.join(fixtures, base), "-o", model, "--quant", "f32", "--force"],
                   check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    for p, case in zip(gb["prompts"], gb["base"]):
        got, logits, err = run(model, p["text"])
        if err:
            print(f"FAIL {base}: {err}")
            failures += 1
            continue
        check(f"{base} base {p['text'][:16]!r}", got, logits, case)
    for name, cases in gb["adapters"].items():
        src = os.path.join(lora, base, name)
        zsa = os.path.join(work, f"{base}-{name}.zsa")
        r = subprocess.run([zse, "convert-adapter", src, "-o", zsa, "--base", model, "--force"], capture_output=True,
                           text=True)
        if r.returncode != 0:
            print(f"FAIL {base}/{name}: convert-adapter: {r.stderr.strip()}")
            failures += 1
            continue
        for form, path in (("peft", src), ("zsa", zsa)):
            # the .zsa holds the same f16 parts: one prompt shows it reads them (test time)
            for p, case in list(zip(gb["prompts"], cases))[: None if form == "peft" else 1]:
                got, logits, err = run(model, p["text"], path)
                if err:
                    print(f"FAIL {base}/{name} ({form}): {err}")
                    failures += 1
                    continue
                check(f"{base}/{name} ({form}) {p['text'][:16]!r}", got, logits, case)
    # a scale of 0 adds nothing: the base model's logits, bit for bit
    first = next(iter(gb["adapters"]))
    p = gb["prompts"][0]["text"]
    _, base_logits, e1 = run(model, p)
    _, zero_logits, e2 = run(model, p, os.path.join(lora, base, first), ("--lora-scale", "0"))
    ok = not e1 and not e2 and base_logits == zero_logits
    print(f"{'ok  ' if ok else 'FAIL'} {base}/{first} --lora-scale 0 equals the base model")
    checked += 1
    failures += not ok
print(f"{checked - failures} passed, {failures} failed")
sys.exit(1 if failures or checked == 0 else 0)
