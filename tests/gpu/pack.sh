#!/usr/bin/env bash
# tests/gpu/pack.sh [DIR] — what a GPU device call carries beside the working tree (which the
# device gets anyway), built here: the device image has no -dev packages to build zse itself.
#   DIR/zse         the binary `make` builds (Release, the default GPU architectures);
#   DIR/zse-75      the same sources with compute_75 PTX only (-DCMAKE_CUDA_ARCHITECTURES=75-virtual),
#                   which the driver JIT-compiles: the sm_75 / no-native-code path of issue 24;
#   DIR/lib/        zse's shared libraries that are not CUDA's or glibc's (LD_LIBRARY_PATH);
#   DIR/.deps/      libjansson-dev's .deb (tests/gpu/run.sh builds backend_test with its header).
# DIR defaults to .device (ignored by git). On the device, from the repository root:
#   LD_LIBRARY_PATH=$PWD/.device/lib ZSE_PREBUILT=$PWD/.device/zse ZSE_PREBUILT75=$PWD/.device/zse-75 \
#       tests/gpu/run.sh $OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.device}
jobs=${JOBS:-2}
make build >/dev/null
cmake -S . -B build-75 -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=75-virtual >/dev/null
cmake --build build-75 -j"$jobs" -t zse >/dev/null
rm -rf "$dir"
mkdir -p "$dir/lib" "$dir/.deps"
cp build/zse "$dir/zse"
cp build-75/zse "$dir/zse-75"
strip "$dir/zse" "$dir/zse-75"
# every library zse links that is neither glibc's nor CUDA's
ldd build/zse | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+)\.so|cuda' |
    while read -r lib; do cp -L "$lib" "$dir/lib/"; done
(cd "$dir/.deps" && apt-get download libjansson-dev >/dev/null 2>&1) || echo "note: libjansson-dev .deb not downloaded"
du -sh "$dir"
