#!/bin/sh
# Runs the API suite (pytest, the openai SDK and langchain-openai) against real `zse serve`
# processes that conftest.py starts on free loopback ports. Exit 77 (CTest: skipped) only
# when the fixture model is absent; "no tests collected" is a failure.
# env: ZSE_BIN (the zse command), ZSE_BUILD (where the converted model goes).
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
if [ ! -f "$ROOT/tests/fixtures/tiny-qwen2/model.safetensors" ] &&
   [ ! -f "$ROOT/../shared/fixtures/tiny-qwen2/model.safetensors" ]; then
  echo "skip: the tiny-qwen2 fixture is in neither tests/fixtures nor ../shared/fixtures"
  exit 77
fi
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ]; then
  PY=python3
  echo "note: $ROOT/.venv is missing (tools/install-deps.sh makes it); using $(command -v python3)"
fi
if ! "$PY" -c "import pytest, openai, langchain_openai" 2>/dev/null; then
  echo "error: $PY lacks pytest, openai or langchain-openai; run tools/install-deps.sh"
  exit 1
fi
cd "$ROOT" || exit 1
export PYTHONDONTWRITEBYTECODE=1
"$PY" -m pytest -p no:cacheprovider -q -rs tests/api "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "error: pytest collected no tests from tests/api"
  exit 1
fi
exit $rc
