#!/usr/bin/env bash
# Builds the libFuzzer targets with clang in their own tree and runs each briefly over its
# seed corpus (tests/fuzz/corpus/<target>). Used by CTest (fuzz_smoke); longer runs:
#   tools/fuzz-smoke.sh SRC BUILD 600
set -euo pipefail
src=${1:?source dir}; build=${2:?build dir}; secs=${3:-15}
if ! command -v clang >/dev/null; then
  echo "clang not found: install clang and libclang-rt-14-dev (tools/install-deps.sh does)"; exit 1
fi
CC=clang cmake -S "$src" -B "$build" -DZSE_FUZZ=ON -DZSE_CUDA=OFF -DBUILD_TESTING=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
export ZSE_FUZZ_TOKENIZER="$src/tests/fixtures/tiny-llama"
targets=$(cd "$src/tests/fuzz" && ls fuzz_*.c | sed 's/\.c$//')
cmake --build "$build" -j"$(nproc)" --target $targets >/dev/null
for t in $targets; do
  corpus="$src/tests/fuzz/corpus/${t#fuzz_}"
  work="$build/corpus-${t#fuzz_}"
  mkdir -p "$work"
  [ -d "$corpus" ] && cp -n "$corpus"/* "$work"/ 2>/dev/null || true
  echo "== $t (${secs}s)"
  "$build/$t" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=131072 "$work" 2>&1 | tail -n 3
done
echo "fuzz smoke: all targets ran without a crash"
