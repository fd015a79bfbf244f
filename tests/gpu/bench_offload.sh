#!/usr/bin/env bash
# tests/gpu/bench_offload.sh ZSE OUTDIR — issue 18's numbers (models beyond VRAM) on the GPU
# device, random weights of real shapes written straight to .zse / .gguf by
# tools/synth_model.py --zse-direct / --gguf-direct (needs python3 + numpy; no bf16 source: a
# 72B bf16 directory would not fit the device's disk). Every model file is deleted after its
# runs (ZSE_BENCH_KEEP=1 keeps them) so the largest one alone must fit the disk (~40 GB).
#
#   0. PCIe host-to-device bandwidth (backend_test --bench-offload: registered host memory and a
#      pinned copy, through the backend's copy queue): the bound a streamed byte moves at.
#   1. Qwen2.5-32B-shaped int4, --gpu-memory 19G, 4k context: placement (resident if it fits),
#      decode tok/s, peak VRAM by nvidia-smi.
#   2. Qwen2.5-72B-shaped int4 (~40 GB) via zStream on --gpu-memory 24G: prefill-512 and decode
#      tok/s, and decode as a fraction of the PCIe bound (H2D GB/s / streamed bytes a token).
#   3. Mixtral-8x7B- and Qwen3-30B-A3B-shaped int4, experts offloaded on 12G and 24G budgets and
#      fully resident: prefill-512 and decode (ZSE_HOST_EXPERTS auto and never); when
#      LLAMA_CPP_BIN names a directory with a CUDA build of llama.cpp's llama-bench, the same
#      shapes as Q4_0 GGUF: -ngl 99 with every expert on the CPU (-ncmoe all layers, llama.cpp's
#      --cpu-moe), with the experts of as many layers on the CPU as the budget needs
#      (-ncmoe N, the -ot exps=CPU placement sized to the budget), and fully on the GPU.
#
# Environment: ZSE_BENCH_WORK (default /tmp/zse-bench-offload), ZSE_BENCH_ONLY (a list of
# 0 1 2 3), BACKEND_TEST (default build-gpu/backend_test, built by tests/gpu/run.sh),
# LLAMA_CPP_BIN, ZSE_BENCH_GEN (decode tokens, default 128; the 72B run uses 32), ZSE_BENCH_MOE
# (the MoE presets of 3 as PRESET:LAYERS, default both), ZSE_BENCH_HOSTS (ZSE_HOST_EXPERTS
# values tried on a budget, default "auto never").
set -u
zse=${1:?zse binary}; out=${2:?output dir}
work=${ZSE_BENCH_WORK:-/tmp/zse-bench-offload}
only=${ZSE_BENCH_ONLY:-0 1 2 3}
bt=${BACKEND_TEST:-build-gpu/backend_test}
gen=${ZSE_BENCH_GEN:-128}
mkdir -p "$out" "$work"
log="$out/bench-offload.txt"
note() { echo "$*" | tee -a "$log"; }
want() { case " $only " in *" $1 "*) return 0;; esac; return 1; }
note "== $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM"
python3 -c "import numpy" 2>/dev/null || { note "numpy missing: tools/synth_model.py cannot run"; exit 1; }

drop() { [ "${ZSE_BENCH_KEEP:-0}" = 1 ] || rm -f "$@"; }

synth() { # PRESET FILE [--zse-direct|--gguf-direct]
    local flag=${3:---zse-direct}
    [ -f "$2" ] && return 0
    local t0=$(date +%s)
    python3 tools/synth_model.py --preset "$1" $flag "$2" 2>>"$log" || { note "synth $1 FAILED"; return 1; }
    note "synth $1 -> $(basename "$2"): $(( $(date +%s) - t0 )) s, $(stat -c %s "$2") bytes"
}

# zse bench under nvidia-smi: the JSON line, then the peak VRAM it took over the idle device
zbench() { # NAME FILE ENV ARGS...
    local name=$1 m=$2 envs=$3; shift 3
    local idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$work/vram.log" 2>/dev/null &
    local smi=$!
    env $envs "$zse" bench "$m" --device cuda --json "$@" >"$work/bench.json" 2>>"$log"
    local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    local peak=$(sort -n "$work/vram.log" | tail -1)
    [ $rc -eq 0 ] || { note "$name: zse bench FAILED (rc $rc)"; tail -3 "$log"; return 1; }
    note "$name: $(tr -d '\n' <"$work/bench.json")"
    note "$name: peak VRAM $((peak - idle)) MiB over the idle device (nvidia-smi)"
}

summary() { # NAME: one line from the last bench JSON
    python3 - "$1" "$work/bench.json" "${H2D:-0}" <<'PY' | tee -a "$log"
import json, sys
name, path, h2d = sys.argv[1], sys.argv[2], float(sys.argv[3])
r = json.load(open(path))
p, o = r.get("placement", {}), r.get("offload", {})
d = o.get("decode", {})
line = (f"{name}: {p.get('mode')} (layers {p.get('layers_resident')}+{p.get('layers_streamed')} streamed, experts "
        f"{p.get('experts_cached')}/{p.get('experts_total')} cached) prefill {r['prefill_tok_s']:.0f} tok/s, decode "
        f"{r['decode_tok_s']:.2f} tok/s")
if d:
    line += (f"; per decode step: {d['experts_hit']:.1f} hit, {d['experts_fetched']:.1f} fetched, "
             f"{d['experts_on_host']:.1f} on host, {d['layers_streamed']:.1f} layers, {d['mb_to_device']:.0f} MB")
    if h2d > 0 and d["mb_to_device"] > 0:
        bound = h2d * 1e3 / (d["mb_to_device"] * 1.048576)
        line += f"; PCIe bound {bound:.2f} tok/s ({h2d:.1f} GB/s), decode at {100 * r['decode_tok_s'] / bound:.0f}% of it"
print(line)
PY
}

# ---- 0. PCIe -------------------------------------------------------------------------------------
H2D=47
if want 0; then
    if [ -x "$bt" ]; then
        "$bt" --bench-offload 2>&1 | tee -a "$log"
        v=$(grep -m1 "registered host range" "$log" | sed 's/.*: \([0-9.]*\) GB\/s.*/\1/')
        [ -n "$v" ] && H2D=$v
    else
        note "no $bt (tests/gpu/run.sh builds it): the PCIe bound below assumes $H2D GB/s"
    fi
fi
note "PCIe H2D for the bounds: $H2D GB/s"

# ---- 1. Qwen2.5-32B int4 on 19 GB ------------------------------------------------------------------
if want 1; then
    m=$work/q32-int4.zse
    if synth qwen2.5-32b "$m"; then
        "$zse" info "$m" --gpu-memory 19G --ctx 4096 | tail -3 | tee -a "$log"
        zbench "qwen2.5-32b int4 19G" "$m" "" --gpu-memory 19G --ctx 4096 --prompt-tokens 512 --gen-tokens "$gen" &&
            summary "qwen2.5-32b int4 --gpu-memory 19G ctx 4096"
        drop "$m"
    fi
fi

# ---- 2. Qwen2.5-72B int4 via zStream on 24 GB -------------------------------------------------------
if want 2; then
    m=$work/q72-int4.zse
    if synth qwen2.5-72b "$m"; then
        "$zse" info "$m" --gpu-memory 24G --ctx 4096 | tail -3 | tee -a "$log"
        zbench "qwen2.5-72b int4 24G" "$m" "" --gpu-memory 24G --ctx 4096 --prompt-tokens 512 --gen-tokens 32 &&
            summary "qwen2.5-72b int4 --gpu-memory 24G ctx 4096 (zStream)"
        for b in 3 4; do
            zbench "qwen2.5-72b int4 24G, $b buffers" "$m" "ZSE_STREAM_BUFFERS=$b" --gpu-memory 24G --ctx 4096 \
                --prompt-tokens 512 --gen-tokens 16 && summary "qwen2.5-72b int4 24G, $b layer buffers"
        done
        drop "$m"
    fi
fi

# ---- 3. MoE: experts offloaded, beside llama.cpp ----------------------------------------------------
llama_bench() { # NAME GGUF ARGS...
    local name=$1 g=$2; shift 2
    local idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$work/vram.log" 2>/dev/null &
    local smi=$!
    "$LLAMA_CPP_BIN/llama-bench" -m "$g" -ngl 99 -p 512 -n "$gen" -r 2 -o jsonl "$@" >"$work/llama.jsonl" 2>>"$log"
    local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    local peak=$(sort -n "$work/vram.log" | tail -1)
    [ $rc -eq 0 ] || { note "$name: llama-bench FAILED (rc $rc)"; return 1; }
    python3 - "$name" "$work/llama.jsonl" "$((peak - idle))" <<'PY' | tee -a "$log"
import json, sys
name, path, peak = sys.argv[1], sys.argv[2], sys.argv[3]
for line in open(path):
    r = json.loads(line)
    what = "prefill" if r.get("n_prompt") else "decode"
    print(f"{name}: llama.cpp {what} {r['avg_ts']:.2f} tok/s (± {r.get('stddev_ts', 0):.2f}); peak VRAM {peak} MiB")
PY
}

# the first N layers' experts on the CPU so the rest fit the budget (llama-bench -ncmoe N)
cpu_moe_layers() { # GGUF LAYERS BUDGET_GIB
    python3 - "$1" "$2" "$3" <<'PY'
import os, sys
path, layers, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) * 2**30
size = os.path.getsize(path)
# expert bytes a layer: the file less ~6% outside the experts (embeddings, attention), by layer;
# 1.5 GiB for llama.cpp's compute buffers, KV and CUDA context
per_layer = size * 0.94 / layers
need = size + 1.5 * 2**30 - budget
print(max(0, min(layers, int(-(-need // per_layer)))))
PY
}

if want 3; then
    for entry in ${ZSE_BENCH_MOE:-mixtral-8x7b:32 qwen3-30b-a3b:48}; do
        preset=${entry%%:*} layers=${entry#*:}
        m=$work/$preset-int4.zse
        synth "$preset" "$m" || continue
        for b in 12G 24G; do
            "$zse" info "$m" --gpu-memory $b --ctx 4096 | tail -3 | tee -a "$log"
            for host in ${ZSE_BENCH_HOSTS:-auto never}; do
                zbench "$preset int4 $b host=$host" "$m" "ZSE_HOST_EXPERTS=$host" --gpu-memory $b --ctx 4096 \
                    --prompt-tokens 512 --gen-tokens "$gen" && summary "$preset int4 --gpu-memory $b, ZSE_HOST_EXPERTS=$host"
            done
        done
        zbench "$preset int4 resident" "$m" "" --ctx 4096 --prompt-tokens 512 --gen-tokens "$gen" &&
            summary "$preset int4 resident"
        drop "$m"
        if [ -n "${LLAMA_CPP_BIN:-}" ] && [ -x "$LLAMA_CPP_BIN/llama-bench" ]; then
            g=$work/$preset-Q4_0.gguf
            synth "$preset" "$g" --gguf-direct || continue
            llama_bench "$preset Q4_0 -ncmoe $layers (--cpu-moe)" "$g" -ncmoe "$layers"
            for b in 12 24; do
                n=$(cpu_moe_layers "$g" "$layers" $b)
                llama_bench "$preset Q4_0 ${b}G: -ncmoe $n" "$g" -ncmoe "$n"
            done
            llama_bench "$preset Q4_0 fully on the GPU" "$g"
            drop "$g"
        else
            note "$preset: llama.cpp not run (LLAMA_CPP_BIN names no directory with llama-bench)"
        fi
    done
fi
note "== done $(date -u +%H:%MZ)"
