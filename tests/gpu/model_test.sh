#!/usr/bin/env bash
# tests/gpu/model_test.sh ZSE OUTDIR — the model end to end on the GPU against the CPU
# backend: converts the tiny-llama fixture at f32, bf16, int8, int8g and int4, and the qwen3
# and mixture-of-experts fixtures (tests/fixtures/random: qwen3-headdim, qwen2-moe,
# qwen3-moe, mixtral) at f32, int8 and int4, runs greedy generation and the prompt's
# last-position logits on --device cpu and --device cuda, and compares them (ids must match
# for f32/bf16; logits within a relative tolerance). Then `zse bench` on each tiny-llama
# file, LoRA adapters on CUDA against the CPU backend and against PEFT's goldens, and
# `zse hardware` / `--fit` (the GPU must be listed and the model resident on it).
# Then weights in host memory: layers streamed and experts offloaded, forced by the knobs on
# the fixtures and by --gpu-memory on synthetic models, against the resident logits.
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
# ---- weights in host memory --------------------------------------------------------------------
# 1. Forced by the knobs on the fixtures converted above (recordings off on both sides, so
#    the steps run the same kernels): streamed layers and experts fetched into the cache
#    (never on the host) give the resident CUDA logits bit for bit; experts on the host (the
#    CPU's kernels) agree within the CPU-vs-CUDA tolerance, f32 greedy ids equal.
logits_of() { # FILE PROMPT N OUT ["ENV=V ..."] ["--more args"]: greedy ids and last logits on cuda
    local m=$1 p=$2 n=$3 o=$4 envs=${5:-} args=${6:-}
    env ZSE_CUDA_GRAPHS=0 $envs "$zse" run "$m" -p "$p" -n $n --temp 0 --ids --device cuda $args \
        --dump-logits $o.logits >$o.ids 2>>"$log"
}
compare() { # WHAT A B TOL(0: bit for bit) IDS_MUST_MATCH
    python3 - "$@" <<'PY' || fail=1
import json, math, sys
what, a, b, tol, ids = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
try:
    x, y = json.load(open(a + ".logits")), json.load(open(b + ".logits"))
    ia, ib = json.load(open(a + ".ids")), json.load(open(b + ".ids"))
except Exception as e:
    print(f"{what}: no output to compare ({e}) -> FAILED"); sys.exit(1)
num = sum((u - v) ** 2 for u, v in zip(x, y)); den = sum(u * u for u in x)
rel = math.sqrt(num / den) if den else math.sqrt(num)
ok = (x == y if tol == 0 else rel < tol) and (ia == ib or not ids)
print(f"{what}: logits {'bit for bit' if x == y else f'rel err {rel:.2e}'} (tol {tol:g}), greedy ids "
      f"{'equal' if ia == ib else 'differ'} ({len(ia)} tokens) -> {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
}
for q in f32 int4; do
    m=$work/tiny-llama-$q.zse
    [ -f "$m" ] || continue
    logits_of $m "$prompt" 24 $work/res || { echo "offload tiny-llama $q: run FAILED"; fail=1; }
    for knobs in "ZSE_STREAM_LAYERS=3" "ZSE_STREAM_LAYERS=4 ZSE_STREAM_BUFFERS=1" "ZSE_STREAM_LAYERS=2 ZSE_STREAM_BUFFERS=3"; do
        logits_of $m "$prompt" 24 $work/off "$knobs" && compare "offload tiny-llama $q $knobs" $work/res $work/off 0 1 ||
            { echo "offload tiny-llama $q $knobs: FAILED"; fail=1; }
    done
done
for entry in mixtral:4 qwen3-moe:8; do
    name=${entry%%:*} slots=${entry#*:}
    p=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['logits'][0]['prompt'] + 'x', end='')" \
        tests/fixtures/random/$name/goldens.json); p=${p%x}
    for q in f32 int4; do
        m=$work/$name-$q.zse
        [ -f "$m" ] || continue
        logits_of $m "$p" 24 $work/res || { echo "offload $name $q: run FAILED"; fail=1; continue; }
        logits_of $m "$p" 24 $work/off "ZSE_EXPERT_CACHE=$slots ZSE_HOST_EXPERTS=never" &&
            compare "offload $name $q, $slots cached, every miss fetched" $work/res $work/off 0 1 || fail=1
        tol=2e-3; [ $q = int4 ] && tol=1e-1
        logits_of $m "$p" 24 $work/off "ZSE_EXPERT_CACHE=$slots ZSE_HOST_EXPERTS=always" &&
            compare "offload $name $q, $slots cached, every miss on the host" $work/res $work/off $tol \
                $([ $q = f32 ] && echo 1 || echo 0) || fail=1
    done
done
# 2. By the budget: synthetic models a few hundred MB large (tools/synth_model.py --zse-direct,
#    needs numpy), --gpu-memory between the streamed (or offloaded) minimum and the resident
#    one (from zse info --gpu-memory --json): zse info says streamed / experts offloaded, the
#    run gives the resident logits (bit for bit with every expert miss fetched, within 1e-2
#    with the host's share), zse bench reports the placement and peak VRAM stays inside the
#    budget plus the CUDA context.
if python3 -c "import numpy" 2>/dev/null; then
    budget_between() { # FILE -> a --gpu-memory in MiB a bit under the resident minimum
        "$zse" info "$1" --gpu-memory 64G --ctx 1024 --json | python3 -c "
import json,sys; p=json.load(sys.stdin)['placement']; print(int(p['minimum_bytes'] / 2**20) - ${2:-40})"
    }
    for shape in "dense:--arch qwen2 --layers 8 --hidden 2048 --ffn 5632 --heads 16 --kv-heads 2 --vocab 32768" \
                 "moe:--arch qwen3_moe --layers 4 --hidden 1024 --ffn 2048 --heads 8 --kv-heads 2 --head-dim 128 --vocab 32768 --experts 32 --experts-used 4 --moe-ffn 512"; do
        kind=${shape%%:*}
        m=$work/synth-$kind.zse
        if ! python3 tools/synth_model.py ${shape#*:} --zse-direct $m >>"$log" 2>&1; then
            echo "offload budget $kind: synth FAILED"; fail=1; continue
        fi
        b=$(budget_between $m 60)
        want=streamed; [ $kind = moe ] && want="experts offloaded"
        if "$zse" info $m --gpu-memory ${b}M --ctx 1024 | grep -q "KV: $want"; then
            echo "offload budget $kind: zse info --gpu-memory ${b}M says $want -> ok"
        else
            echo "offload budget $kind: zse info --gpu-memory ${b}M: not $want -> FAILED"; "$zse" info $m --gpu-memory ${b}M --ctx 1024 | tail -3; fail=1
        fi
        logits_of $m "$prompt" 16 $work/res || { echo "offload budget $kind: resident run FAILED"; fail=1; continue; }
        logits_of $m "$prompt" 16 $work/off "ZSE_HOST_EXPERTS=never" "--gpu-memory ${b}M --ctx 1024" &&
            compare "offload budget $kind, --gpu-memory ${b}M, misses fetched" $work/res $work/off 0 1 || fail=1
        if [ $kind = moe ]; then
            logits_of $m "$prompt" 16 $work/off "" "--gpu-memory ${b}M --ctx 1024" &&
                compare "offload budget $kind, --gpu-memory ${b}M, host share automatic" $work/res $work/off 1e-2 0 || fail=1
        fi
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >$work/vram.log 2>/dev/null &
        smi=$!
        before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
        "$zse" bench $m --device cuda --gpu-memory ${b}M --ctx 1024 --prompt-tokens 256 --gen-tokens 32 --json \
            >$work/bench.json 2>>"$log"
        kill $smi 2>/dev/null; wait $smi 2>/dev/null
        python3 - "$kind" "$want" $work/bench.json $b "$before" $work/vram.log <<'PY' || fail=1
import json, sys
kind, want, path, budget, before, vram = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
try:
    r = json.load(open(path))
except Exception as e:
    print(f"offload budget {kind}: bench gave no JSON ({e}) -> FAILED"); sys.exit(1)
peak = max([int(l) for l in open(vram) if l.strip().isdigit()] or [0]) - int(before or 0)
other = r["memory_mb"].get("device_other", 0)
ok = r["placement"]["mode"] == want and "offload" in r and peak <= budget + other + 64
print(f"offload budget {kind}: bench {r['placement']} prefill {r['prefill_tok_s']:.0f} tok/s decode "
      f"{r['decode_tok_s']:.1f} tok/s, per decode step {r.get('offload', {}).get('decode')}; peak VRAM {peak} MiB over "
      f"the idle device (budget {budget} + context/libraries {other:.0f}) -> {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
    done
else
    echo "offload budget: skipped (no numpy for tools/synth_model.py)"
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
