#!/usr/bin/env bash
# tests/gpu/bench_engine.sh ZSE OUTDIR — the engine core's numbers on the GPU device
# (docs/BENCHMARKS.md §Engine core), on a Qwen2.5-7B-shaped int4 synthetic model:
#   1. prefix cache: time to first token of a 2,000-token prompt, then of the same prompt
#      again (zse bench --prefix-cache), and 64 requests sharing a 1,000-token prefix, with
#      the cache and without;
#   2. speculative decoding at batch 1: plain decode, --spec ngram, and a draft model that
#      agrees by construction — the same synthetic weights cut to their first DRAFT_LAYERS
#      layers (tools/synth_model.py derives every tensor from the seed and its name, so the
#      draft's embedding, layers, norm and head are the target's own) — with the greedy ids
#      of each compared against plain decoding.
# Reuses the synthetic model of bench7b.sh (ZSE_BENCH_WORK, default /tmp/zse-bench7b).
set -u
zse=${1:?zse binary}; out=${2:?output dir}
work=${ZSE_BENCH_WORK:-/tmp/zse-bench7b}
draft_layers=${DRAFT_LAYERS:-2}
mkdir -p "$out" "$work"
log="$out/bench-engine.txt"
note() { echo "$*" | tee -a "$log"; }
note "== $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) $($zse --version 2>/dev/null)"
if [ ! -f "$work/int4.zse" ]; then
    [ -f "$work/hf/config.json" ] || python3 tools/synth_model.py --preset qwen2.5-7b --out "$work/hf" 2>/dev/null ||
        { note "synth failed"; exit 1; }
    "$zse" convert "$work/hf" -o "$work/int4.zse" --quant int4 --force 2>>"$log" || { note "convert failed"; exit 1; }
fi
draft="$work/draft-$draft_layers.zse"
if [ ! -f "$draft" ]; then
    python3 tools/synth_model.py --preset qwen2.5-7b --layers "$draft_layers" --out "$work/hf-draft" 2>/dev/null &&
        "$zse" convert "$work/hf-draft" -o "$draft" --quant int4 --force 2>>"$log" || note "draft failed"
fi
m="$work/int4.zse"

note "-- prefix cache: a 2,000-token prompt, then the same again"
for i in 1 2; do
    "$zse" bench "$m" --device cuda --ctx 4096 --prompt-tokens 2000 --gen-tokens 16 --prefix-cache --json 2>>"$log" |
        tee -a "$log"
done
note "-- 64 requests sharing a 1,000-token prefix (+64 own tokens, 64 generated), without and with the cache"
for pc in "" --prefix-cache; do
    "$zse" bench "$m" --device cuda --prompt-tokens 16 --gen-tokens 8 --concurrency 64 --batch-prompt-tokens 1064 \
        --shared-prefix 1000 --batch-gen-tokens 64 $pc --json 2>>"$log" | tee -a "$log"
done

note "-- speculative decoding, batch 1, 256 tokens after a 512-token code prompt"
prompt=tests/fixtures/eval.txt
for spec in "" "--spec ngram" "--spec ngram --spec-tokens 8" "--draft $draft" "--draft $draft --spec-tokens 8"; do
    note "spec: ${spec:-none}"
    "$zse" bench "$m" --device cuda --prompt-tokens 512 --gen-tokens 256 --prompt-file "$prompt" $spec --json \
        2>>"$log" | tee -a "$log"
done
note "-- greedy ids, 128 tokens: plain vs speculative"
head -c 3000 "$prompt" >"$work/prompt.txt"
"$zse" run "$m" --device cuda -f "$work/prompt.txt" -n 128 --temp 0 --ignore-eos --ids 2>/dev/null >"$work/ids-plain.json"
for spec in "--spec ngram" "--draft $draft"; do
    "$zse" run "$m" --device cuda -f "$work/prompt.txt" -n 128 --temp 0 --ignore-eos --ids $spec 2>>"$log" \
        >"$work/ids-spec.json"
    if cmp -s "$work/ids-plain.json" "$work/ids-spec.json"; then
        note "greedy ids with $spec: identical"
    else
        note "greedy ids with $spec: DIFFER"
        python3 -c "import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:]); \
i=next((k for k,(x,y) in enumerate(zip(a,b)) if x!=y),None); print('first difference at', i, 'of', len(a))" \
            "$work/ids-plain.json" "$work/ids-spec.json" | tee -a "$log"
    fi
done
