#!/usr/bin/env bash
# tests/gpu/model_test.sh ZSE OUTDIR — the model end to end on the GPU against the CPU
# backend: converts the tiny-llama fixture at f32, bf16, int8, int8g and int4, and the qwen3
# and mixture-of-experts fixtures (tests/fixtures/random: qwen3-headdim, qwen2-moe,
# qwen3-moe, mixtral) at f32, int8 and int4, runs greedy generation and the prompt's
# last-position logits on --device cpu and --device cuda, and compares them (ids must match
# for f32/bf16; logits within a relative tolerance). Then `zse bench` on each tiny-llama
# file, LoRA adapters on CUDA against the CPU backend and against PEFT's goldens, and
# `zse hardware` / `--fit` (the GPU must be listed and the model resident on it).
# Called by tests/gpu/run.sh. Logs go to OUTDIR/model.log and the bench JSON lines to
# OUTDIR/model-bench.jsonl (the device returns at most 8 files).
set -u
zse=$1
out=$2
work=$(mktemp -d)
prompt="def fibonacci(n):"
fail=0
log=$out/${ZSE_MODEL_LOG:-model.log}
: >"$log"
[ -n "${ZSE_MODEL_LOG:-}" ] || : >"$out/model-bench.jsonl"
models="tiny-llama:f32,bf16,int8,int8g,int4"
for m in qwen3-headdim qwen2-moe qwen3-moe mixtral; do
    models="$models random/$m:f32,int8,int4"
done
for entry in $models; do
  fx=tests/fixtures/${entry%%:*}
  name=$(basename "$fx")
  for q in $(echo "${entry#*:}" | tr , ' '); do
    m=$work/$name-$q.zse
    if ! "$zse" convert "$fx" -o "$m" --quant $q >>"$log" 2>&1; then
        echo "model $name $q: convert FAILED"; tail -3 "$log"; fail=1; continue
    fi
    # the random fixtures run their golden prompt (45 tokens: the prefill takes the tensor-core
    # expert matmul at int4), whose greedy steps and expert choices are clear of near-ties
    p=$prompt; n=32
    if [ "$name" != tiny-llama ]; then
        p=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['logits'][0]['prompt'] + 'x', end='')" \
            "$fx/goldens.json")
        p=${p%x}    # the prompt ends in a newline, which $(...) would drop
        n=24
    fi
    for d in cpu cuda; do
        "$zse" run "$m" -p "$p" -n $n --temp 0 --ids --device $d --dump-logits $work/logits-$q-$d.json \
            >$work/ids-$q-$d.json 2>>"$log" || { echo "model $name $q $d: run FAILED"; tail -3 "$log"; fail=1; }
    done
    python3 - "$name $q" $work/ids-$q-cpu.json $work/ids-$q-cuda.json $work/logits-$q-cpu.json $work/logits-$q-cuda.json <<'PY' || fail=1
import json, math, sys
q, ic, ig, lc, lg = sys.argv[1:]
q_scheme = q.split()[-1]
try:
    a, b = json.load(open(ic)), json.load(open(ig))
    x, y = json.load(open(lc)), json.load(open(lg))
except Exception as e:
    print(f"model {q}: no output to compare ({e})"); sys.exit(1)
num = sum((u - v) ** 2 for u, v in zip(x, y)); den = sum(u * u for u in x)
rel = math.sqrt(num / den) if den else math.sqrt(num)
same = a == b
first = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
# a quantized MoE model may route a near-tie differently on the two backends (their x
# quantization differs): its logits get more room, a wrong expert or weight is still O(1)
moe = any(a in q for a in ("moe", "mixtral"))
tol = 2e-3 if q_scheme in ("f32", "bf16") else 1e-1 if moe else 2e-2
ok = rel < tol and (same or q_scheme not in ("f32", "bf16"))
print(f"model {q}: cuda vs cpu: logits rel err {rel:.2e} (tol {tol:g}), greedy ids "
      f"{'equal' if same else f'differ from position {first}'} ({len(a)} tokens) -> {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
    if [ "$name" = tiny-llama ] && "$zse" bench "$m" --device cuda --json >$work/bench.json 2>>"$log"; then
        tr -d '\n' <$work/bench.json >>"$out/model-bench.jsonl"
        echo >>"$out/model-bench.jsonl"
        echo "bench $q: $(tr -d '\n' <$work/bench.json | cut -c1-300)"
    fi
  done
done
# LoRA adapters (tests/fixtures/lora): zse run --lora on CUDA against the CPU backend (f32:
# logits within 2e-3 and the same ids; int4 base: logits within 2e-2), then CUDA against
# PEFT's goldens (check_lora.py: zse run's default device is the GPU)
for q in f32 int4; do
  m=$work/tiny-llama-$q.zse
  for a in tests/fixtures/lora/tiny-llama/*/; do
    a=${a%/}
    for d in cpu cuda; do
        "$zse" run "$m" -p "$prompt" -n 24 --temp 0 --ids --ignore-eos --device $d --lora "$a" \
            --dump-logits $work/lora-logits-$d.json >$work/lora-ids-$d.json 2>>"$log" ||
            { echo "lora $(basename $a) $q $d: run FAILED"; tail -3 "$log"; fail=1; }
    done
    python3 - "lora $(basename $a) $q" $work/lora-ids-cpu.json $work/lora-ids-cuda.json $work/lora-logits-cpu.json \
        $work/lora-logits-cuda.json <<'PY' || fail=1
import json, math, sys
what, ic, ig, lc, lg = sys.argv[1:]
try:
    a, b, x, y = (json.load(open(f)) for f in (ic, ig, lc, lg))
except Exception as e:
    print(f"{what}: no output to compare ({e})"); sys.exit(1)
rel = math.sqrt(sum((u - v) ** 2 for u, v in zip(x, y)) / sum(u * u for u in x))
f32 = what.endswith("f32")
ok = rel < (2e-3 if f32 else 2e-2) and (a == b or not f32)
print(f"{what}: cuda vs cpu: logits rel err {rel:.2e}, greedy ids {'equal' if a == b else 'differ'} -> "
      f"{'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
  done
done
if python3 tests/golden/check_lora.py "$zse" tests/fixtures $work/lora-gold >$work/lora-gold.txt 2>&1; then
    echo "lora goldens on cuda: $(tail -1 $work/lora-gold.txt) -> ok"
else
    echo "lora goldens on cuda: FAILED"; grep -v "^ok" $work/lora-gold.txt; fail=1
fi
# zse hardware lists this GPU; --fit finds the model resident on it
if "$zse" hardware >$work/hw.txt 2>&1 && grep -q "^gpu 0: .*GiB.*compute capability [0-9]" $work/hw.txt; then
    echo "hardware: $(grep -m1 '^gpu 0:' $work/hw.txt) -> ok"
else
    echo "hardware: no GPU listed -> FAILED"; cat $work/hw.txt; fail=1
fi
if "$zse" hardware --fit $work/tiny-llama-int4.zse >$work/fit.txt 2>&1 && grep -q "^cuda:0 .* resident " $work/fit.txt; then
    echo "hardware --fit: $(grep -m1 '^cuda:0' $work/fit.txt | tr -s ' ') -> ok"
else
    echo "hardware --fit: cuda:0 not resident -> FAILED"; cat $work/fit.txt; fail=1
fi
rm -rf "$work"
exit $fail
