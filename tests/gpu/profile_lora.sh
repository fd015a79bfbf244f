#!/usr/bin/env bash
# tests/gpu/profile_lora.sh ZSE OUTDIR — where an adapter's decode time goes on the GPU:
# bs1 decode of the bench7b model with and without a rank-16 adapter on all seven
# projections (the files of bench_lora.sh), under the CUDA switches that change the step
# (recorded graphs off, programmatic dependent launch off), then, where Nsight Systems is
# installed, its per-kernel summary of the adapter's run.
set -u
zse=${1:?zse binary}; out=${2:?output dir}
work=${ZSE_BENCH_WORK:-/tmp/zse-bench7b}
mkdir -p "$out"
log="$out/profile-lora.txt"
note() { echo "$*" | tee -a "$log"; }
if [ ! -f "$work/int4.zse" ] || [ ! -f "$work/lora/r16.zsa" ]; then
    ZSE_BENCH_ONLY_SETUP=1 ZSE_BENCH_GEN=8 ZSE_BENCH_BATCH=8 tests/gpu/bench_lora.sh "$zse" "$out/setup" >/dev/null 2>&1
fi
m="$work/int4.zse"; zsa="$work/lora/r16.zsa"
dec() { local envs=$1; shift; env $envs "$zse" bench "$m" --device cuda --prompt-tokens 64 --gen-tokens 128 --json "$@" 2>>"$log" |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"prefill {r['prefill_tok_s']:.0f} decode {r['decode_tok_s']:.1f}\")"; }
for envs in "" "ZSE_CUDA_GRAPHS=0" "ZSE_CUDA_NO_PDL=1"; do
    note "${envs:-default}: base $(dec "$envs") | adapter $(dec "$envs" --lora "$zsa")"
done
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -n "$nsys" ]; then
    for what in base adapter; do
        extra=""; [ $what = adapter ] && extra="--lora $zsa"
        "$nsys" profile -o "$out/$what" --force-overwrite true -t cuda "$zse" bench "$m" --device cuda \
            --prompt-tokens 64 --gen-tokens 256 $extra >/dev/null 2>>"$log"
        note "-- nsys kernels, $what"
        "$nsys" stats -q --report cuda_gpu_kern_sum --format csv "$out/$what.nsys-rep" 2>>"$log" | head -25 | tee -a "$log"
        "$nsys" stats -q --report cuda_api_sum --format csv "$out/$what.nsys-rep" 2>>"$log" | head -12 | tee -a "$log"
        rm -f "$out/$what.nsys-rep" "$out/$what.sqlite"
    done
else
    note "nsys: not installed"
fi
