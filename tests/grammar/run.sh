#!/bin/sh
# Runs the grammar suite (pytest + jsonschema) against tools/grammar_sample on the tiny-qwen2
# tokenizer. env: GRAMMAR_SAMPLE (the built tool). "no tests collected" is a failure.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ]; then
  PY=python3
  echo "note: $ROOT/.venv is missing (tools/install-deps.sh makes it); using $(command -v python3)"
fi
if ! "$PY" -c "import pytest, jsonschema" 2>/dev/null; then
  echo "error: $PY lacks pytest or jsonschema; run tools/install-deps.sh"
  exit 1
fi
cd "$ROOT" || exit 1
export PYTHONDONTWRITEBYTECODE=1
"$PY" -m pytest -p no:cacheprovider -q -rs tests/grammar "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "error: pytest collected no tests from tests/grammar"
  exit 1
fi
exit $rc
