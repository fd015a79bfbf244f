#!/usr/bin/env bash
# tests/gpu/bench7b.sh ZSE OUTDIR — end-to-end numbers on a Qwen2.5-7B-shaped synthetic
# model on the GPU device: conversion speed and size, cold start to first token, and
# `zse bench --device cuda` (prefill 512, decode 128, KV cache sized for a 4096-token
# context) for int4 and f16, with peak VRAM as nvidia-smi counts it, and aggregate decode
# through the batching engine at ZSE_BENCH_CONCURRENCY sequences (default 8,32,64; 128
# prompt + 128 generated tokens each). Needs python3 + numpy for tools/synth_model.py.
set -u
zse=${1:?zse binary}; out=${2:?output dir}
work=${ZSE_BENCH_WORK:-/tmp/zse-bench7b}
mkdir -p "$out" "$work"
log="$out/bench7b.txt"
note() { echo "$*" | tee -a "$log"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }
note "== $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) $(nproc) cores"
if [ ! -f "$work/hf/config.json" ]; then
    t0=$(now)
    python3 tools/synth_model.py --preset qwen2.5-7b --out "$work/hf" 2>/dev/null || { note "synth failed"; exit 1; }
    note "synth_model qwen2.5-7b: $(since $t0) s, $(du -sb "$work/hf" | cut -f1) bytes"
fi
for q in ${ZSE_BENCH_QUANTS:-int4 f16}; do
    if [ "${ZSE_BENCH_REUSE:-0}" = 1 ] && [ -f "$work/$q.zse" ]; then
        note "convert $q: reusing $work/$q.zse"
    else
    t0=$(now)
    "$zse" convert "$work/hf" -o "$work/$q.zse" --quant "$q" --force 2>>"$log" || { note "convert $q failed"; continue; }
    note "convert $q: $(since $t0) s, $(stat -c %s "$work/$q.zse") bytes (source $(du -sb "$work/hf" | cut -f1) bytes)"
    fi
    cat "$work/$q.zse" >/dev/null  # page cache warm, as the cold-start goal states
    for i in 1 2 3; do
        t0=$(now)
        "$zse" run "$work/$q.zse" -p "Hello" -n 1 --temp 0 --device cuda >/dev/null 2>>"$out/run.err"
        note "cold start $q (process start -> 1 token, run $i): $(since $t0) s"
    done
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$work/vram-$q.log" 2>/dev/null &
    smi=$!
    "$zse" bench "$work/$q.zse" --device cuda --ctx 4096 --prompt-tokens 512 --gen-tokens 128 --json 2>>"$log" | tee -a "$log"
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    note "peak VRAM $q, 4096-token context (nvidia-smi, MiB): $(sort -n "$work/vram-$q.log" | tail -1)"
    if [ -n "${ZSE_BENCH_CONCURRENCY-8,32,64}" ]; then
        "$zse" bench "$work/$q.zse" --device cuda --prompt-tokens 16 --gen-tokens 8 \
            --concurrency "${ZSE_BENCH_CONCURRENCY-8,32,64}" --json 2>>"$log" | tee -a "$log"
    fi
done
