#!/usr/bin/env bash
# tests/gpu/run.sh — what the GPU device machine runs (docs/CUDA.md describes it).
#
#   tests/gpu/run.sh [OUTDIR]     (OUTDIR defaults to $OUT, else ./gpu-out)
#
# 1. builds the kernel test (nvcc only: needs no Debian -dev packages) and runs its
#    correctness checks against the CPU reference, then its benchmarks;
# 2. builds the whole project with the CUDA backend (needs the -dev packages of README.md;
#    skipped with a note when they are missing) and, when the engine is there, runs the
#    fixtures through `zse run --device cuda` against `--device cpu`.
# Every step's log lands in OUTDIR; the summary goes to stdout and OUTDIR/summary.txt.
set -u
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
arch=${ZSE_CUDA_ARCH:-90}
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

note "== $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
note "== commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

# ---- 1. kernels ------------------------------------------------------------------------
# ZSE_GPU_SKIP_UNITS=1 skips steps 1 and 1b (a model-only run). The correctness checks run
# twice: on native code for sm_$arch, and on compute_75 PTX alone, which the driver
# JIT-compiles for this GPU with every `__CUDA_ARCH__ >= 800` path compiled out (what a
# Turing card runs, and what any GPU runs from a build without its native code; issue 24).
kt=build-gpu/kernels_test
mkdir -p build-gpu
if [ "${ZSE_GPU_SKIP_UNITS:-0}" = 1 ]; then
    note "kernels test: skipped (ZSE_GPU_SKIP_UNITS)"
elif nvcc -std=c++17 -O3 -arch=sm_$arch -Isrc -o $kt tests/gpu/kernels_test*.cu \
        src/backend/cuda/matmul.cu src/backend/cuda/ops.cu src/backend/cuda/sample.cu src/backend/cuda/attention.cu \
        src/backend/cuda/attention_mma.cu src/backend/cuda/moe.cu src/backend/cuda/lora.cu -lcublas >"$out/build.log" 2>&1; then
    $kt >"$out/kernels-test.log" 2>&1
    rc=$?
    note "kernels test (sm_$arch): rc=$rc $(tail -1 "$out/kernels-test.log")"
    [ $rc -ne 0 ] && grep -m 20 FAILED "$out/kernels-test.log" | tee -a "$summary"
    if [ "${ZSE_GPU_JIT75:-1}" = 1 ]; then
        if nvcc -std=c++17 -O3 -gencode arch=compute_75,code=compute_75 -Isrc -o $kt-75 tests/gpu/kernels_test*.cu \
                src/backend/cuda/matmul.cu src/backend/cuda/ops.cu src/backend/cuda/sample.cu src/backend/cuda/attention.cu \
                src/backend/cuda/attention_mma.cu src/backend/cuda/moe.cu src/backend/cuda/lora.cu -lcublas >>"$out/build.log" 2>&1; then
            $kt-75 >>"$out/kernels-test.log" 2>&1
            rc=$?
            note "kernels test (compute_75 PTX, JIT): rc=$rc $(tail -1 "$out/kernels-test.log")"
            [ $rc -ne 0 ] && tail -200 "$out/kernels-test.log" | grep -m 20 FAILED | tee -a "$summary"
        else
            note "kernels test (compute_75 PTX): BUILD FAILED"
        fi
    fi
    if [ "${ZSE_GPU_BENCH:-1}" = 1 ]; then
        $kt --bench >"$out/kernels-bench.log" 2>&1
        note "kernels bench: rc=$?"
        cat "$out/kernels-bench.log" >>"$summary"
    fi
else
    note "kernels test: BUILD FAILED"
    tail -20 "$out/build.log" | tee -a "$summary"
fi

# ---- 1b. the backend through zse_backend_ops ---------------------------------------------
# backend.h pulls in format.h and so <jansson.h> (headers only: nothing of jansson is linked
# here). The device image has no -dev packages: a libjansson-dev .deb carried in .deps/
# is unpacked into build-gpu/deps when the header is missing.
inc=""
deps=.deps; [ -d .device/.deps ] && deps=.device/.deps
if [ ! -f /usr/include/jansson.h ] && ls $deps/libjansson-dev_*.deb >/dev/null 2>&1; then
    mkdir -p build-gpu/deps && dpkg -x $deps/libjansson-dev_*.deb build-gpu/deps && inc="-Ibuild-gpu/deps/usr/include"
fi
bt=build-gpu/backend_test
mkdir -p build-gpu/bt
if [ "${ZSE_GPU_SKIP_UNITS:-0}" = 1 ]; then
    note "backend test: skipped (ZSE_GPU_SKIP_UNITS)"
elif (for f in backend backend_weights backend_step backend_ops backend_moe backend_offload backend_lora \
             matmul ops sample attention attention_mma moe lora; do
        nvcc -std=c++17 -O3 -arch=sm_$arch -Isrc -Iinclude $inc -c src/backend/cuda/$f.cu -o build-gpu/bt/$f.o || exit 1
    done &&
    for f in tests/gpu/backend_test.c src/quant/quant.c src/util/error.c src/util/mem.c src/util/pool.c \
             src/backend/lora_image.c; do
        gcc -std=c11 -O2 -Wall -Wextra -Werror -D_GNU_SOURCE -DZSE_HAVE_CUDA=1 -Isrc -Iinclude -Itests $inc \
            -c $f -o build-gpu/bt/$(basename $f .c).o || exit 1
    done &&
    nvcc -arch=sm_$arch -o $bt build-gpu/bt/*.o -lcublas -lpthread) >>"$out/build.log" 2>&1; then
    $bt >"$out/backend-test.log" 2>&1
    rc=$?
    note "backend test: rc=$rc $(tail -1 "$out/backend-test.log")"
    [ $rc -ne 0 ] && grep -m 20 "FAILED" "$out/backend-test.log" | tee -a "$summary"
    $bt --bench-load 2>&1 | tee -a "$summary"
    $bt --bench-offload 2>&1 | tee -a "$summary"
else
    note "backend test: BUILD FAILED"
    tail -20 "$out/build.log" | tee -a "$summary"
fi

# ---- 2. the whole project --------------------------------------------------------------
# a prebuilt zse (ZSE_PREBUILT) is used as it is; otherwise the tree is built here
if [ -z "${ZSE_PREBUILT:-}" ] && cmake -S . -B build-gpu/zse -DCMAKE_BUILD_TYPE=Release -DZSE_SANITIZE=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=$arch >>"$out/build.log" 2>&1 &&
   cmake --build build-gpu/zse -j"$(nproc)" >>"$out/build.log" 2>&1; then
    note "zse build: ok"
    zse=build-gpu/zse/zse
    if [ -x tests/gpu/model_test.sh ]; then
        tests/gpu/model_test.sh "$zse" "$out" 2>&1 | tee -a "$summary"
    fi
elif [ -n "${ZSE_PREBUILT:-}" ] && [ -x "$ZSE_PREBUILT" ]; then
    # the device image lacks the -dev packages: a zse built elsewhere (same CPU
    # architecture, its shared libraries on LD_LIBRARY_PATH) stands in
    note "zse build: using the prebuilt $ZSE_PREBUILT"
    tests/gpu/model_test.sh "$ZSE_PREBUILT" "$out" 2>&1 | tee -a "$summary"
    # the same on a zse carrying only compute_75 PTX (-DCMAKE_CUDA_ARCHITECTURES=75-virtual)
    if [ -n "${ZSE_PREBUILT75:-}" ] && [ -x "$ZSE_PREBUILT75" ]; then
        note "model test on compute_75 PTX (JIT): $ZSE_PREBUILT75"
        ZSE_MODEL_LOG=model-75.log tests/gpu/model_test.sh "$ZSE_PREBUILT75" "$out" 2>&1 | tee -a "$summary"
    fi
else
    note "zse build: skipped or failed (see build.log): $(grep -m1 -iE 'error|not found' "$out/build.log")"
fi
