#!/usr/bin/env bash
# tests/gpu/bench_lora.sh ZSE OUTDIR — multi-LoRA serving's numbers on the GPU device
# (docs/BENCHMARKS.md §LoRA), on the Qwen2.5-7B-shaped int4 synthetic model of bench7b.sh
# with rank-16 adapters on all seven projections (tools/synth_lora.py, 80 MB each in f16):
#   1. decode at batch 1 and aggregate decode at 32 and 64 sequences: the base model alone,
#      every sequence on one adapter, and each sequence on a different adapter of 100 (all
#      in pinned host memory, a GPU pool of 32; at 64 sequences also a pool of 64, since 32
#      slots let only 32 distinct adapters run at once);
#   2. the time to load an adapter: zse convert-adapter (PEFT -> .zsa), disk -> pinned host
#      (reading, checking and laying out the .zsa), host -> GPU slot (the copy);
#   3. the time a request waits for a cold adapter: first token of a 32-token request whose
#      adapter is on disk only, against the same request once it is in a slot.
# The 100 adapters are one synthetic .zsa under 101 names (symlinks): each is its own
# adapter to zse (its own slot and copy), and identical bytes do not change the speed. The
# "disk" reads come from the page cache after the first.
# Reuses the synthetic model of bench7b.sh (ZSE_BENCH_WORK, default /tmp/zse-bench7b).
# ZSE_BENCH_DEVICE (default cuda) and ZSE_BENCH_PROMPT / _GEN / _BATCH (512 / 128 / 128 tokens)
# let it be tried on a small model elsewhere (a work dir with hf/ and int4.zse of that model).
set -u
zse=${1:?zse binary}; out=${2:?output dir}
work=${ZSE_BENCH_WORK:-/tmp/zse-bench7b}
mkdir -p "$out" "$work/lora/dir"
log="$out/bench-lora.txt"
note() { echo "$*" | tee -a "$log"; }
note "== $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) $($zse --version 2>/dev/null)"
if [ ! -f "$work/int4.zse" ]; then # random int4 codes straight to .zse, config.json beside (minutes less than bf16 + convert)
    python3 tools/synth_model.py --preset qwen2.5-7b --out "$work/hf" --zse-direct "$work/int4.zse" 2>>"$log" ||
        { note "synth failed"; exit 1; }
fi
m="$work/int4.zse"
zsa="$work/lora/r16.zsa"
if [ ! -f "$zsa" ]; then
    python3 tools/synth_lora.py --model "$work/hf" --rank 16 --out "$work/lora/peft-r16" | tee -a "$log" ||
        { note "synth_lora failed"; exit 1; }
    t0=$(date +%s.%N)
    "$zse" convert-adapter "$work/lora/peft-r16" -o "$zsa" --base "$m" --force 2>>"$log" | tee -a "$log" ||
        { note "convert-adapter failed"; exit 1; }
    note "convert-adapter (PEFT f16 -> .zsa): $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)") s"
fi
for i in $(seq -f %03g 0 100); do ln -sf ../r16.zsa "$work/lora/dir/a$i.zsa"; done
[ "${ZSE_BENCH_ONLY_SETUP:-0}" = 1 ] && exit 0 # the files alone (profile_lora.sh)

dev=${ZSE_BENCH_DEVICE:-cuda}; pt=${ZSE_BENCH_PROMPT:-512}; gt=${ZSE_BENCH_GEN:-128}; bt=${ZSE_BENCH_BATCH:-128}
run() { # label, then zse bench flags
    local label=$1; shift
    note "-- $label"
    "$zse" bench "$m" --device "$dev" --prompt-tokens "$pt" --gen-tokens "$gt" --batch-prompt-tokens "$bt" \
        --batch-gen-tokens "$bt" --json "$@" 2>>"$log" | tee -a "$log"
}
run "base alone" --concurrency 32,64
run "every sequence on one adapter" --concurrency 32,64 --lora "$zsa"
run "each sequence on a different adapter of 100, GPU pool 32" --concurrency 32,64 --lora-dir "$work/lora/dir" \
    --lora-adapters 100 --max-gpu-loras 32 --max-cpu-loras 101
run "each sequence on a different adapter of 100, GPU pool 64" --concurrency 64 --lora-dir "$work/lora/dir" \
    --lora-adapters 100 --max-gpu-loras 64 --max-cpu-loras 101
python3 - "$log" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][-4:]
if len(runs) < 4:
    print("summary: missing runs"); sys.exit(1)
base = runs[0]
def agg(r, n):
    return next((c["decode_phase_tok_s"] for c in r.get("concurrent", []) if c["sequences"] == n), None)
print(f"summary: bs1 decode base {base['decode_tok_s']:.1f}, one adapter {runs[1]['decode_tok_s']:.1f} tok/s "
      f"({runs[1]['decode_tok_s'] / base['decode_tok_s']:.2f}x; goal 0.85x)")
for n in (32, 64):
    b = agg(base, n)
    one = agg(runs[1], n)
    many = agg(runs[2], n)
    line = f"summary: {n} sequences: base {b:.0f}, one adapter {one:.0f} ({one / b:.2f}x; goal 0.9x), 100 adapters " \
           f"pool 32 {many:.0f} ({many / b:.2f}x; goal 0.8x)"
    if n == 64:
        wide = agg(runs[3], 64)
        line += f", pool 64 {wide:.0f} ({wide / b:.2f}x)"
    print(line)
l = runs[2]["lora"]
print(f"summary: adapter load: disk -> pinned host {l['load_host_ms']:.1f} ms, host -> GPU slot {l['load_slot_ms']:.2f} ms; "
      f"first token with a cold adapter {l['cold_ttft_s'] * 1e3:.1f} ms vs {l['warm_ttft_s'] * 1e3:.1f} ms warm")
PY
