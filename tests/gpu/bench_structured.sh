#!/usr/bin/env bash
# tests/gpu/bench_structured.sh ZSE OUTDIR — constrained decoding's cost on the GPU device
# (docs/BENCHMARKS.md §Structured output): decode tokens/s under tools/bench-schema.json
# against the same run without it, at batch 1 and 64 sequences, alternately (twice each),
# with each token's mask compute time (p50, p99, mean) from `zse bench --json-schema`.
# Reuses the Qwen2.5-7B-shaped int4 synthetic model of bench7b.sh (ZSE_BENCH_WORK, default
# /tmp/zse-bench7b). Its tokenizer is the tiny fixture's (4,096 tokens; the rows beyond are
# never allowed), so the mask times are those of a small vocabulary: the decode ratio is the
# figure to read here, the 150k-vocabulary mask times are in §Grammar masks.
set -u
zse=${1:?zse binary}; out=${2:?output dir}
work=${ZSE_BENCH_WORK:-/tmp/zse-bench7b}
mkdir -p "$out" "$work"
log="$out/bench-structured.txt"
note() { echo "$*" | tee -a "$log"; }
note "== $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) $($zse --version 2>/dev/null)"
if [ ! -f "$work/int4.zse" ]; then
    [ -f "$work/hf/config.json" ] || python3 tools/synth_model.py --preset qwen2.5-7b --out "$work/hf" 2>/dev/null ||
        { note "synth failed"; exit 1; }
    "$zse" convert "$work/hf" -o "$work/int4.zse" --quant int4 --force 2>>"$log" || { note "convert failed"; exit 1; }
fi
m="$work/int4.zse"
for round in 1 2; do
    for schema in "" "--json-schema tools/bench-schema.json"; do
        note "-- round $round: ${schema:-no schema}"
        # shellcheck disable=SC2086
        "$zse" bench "$m" --device cuda --prompt-tokens 128 --gen-tokens 256 --concurrency 64 \
            --batch-prompt-tokens 128 --batch-gen-tokens 256 --json $schema 2>>"$log" | tee -a "$log"
    done
done
