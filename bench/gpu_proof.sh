#!/usr/bin/env bash
# GPU proof in one command (bench/gpu_proof.py has the steps): on a CUDA machine, with no network,
#   bash bench/gpu_proof.sh --wheels .whl --out gpu-proof
# installs the carried wheels into /tmp/site (pip --no-index --no-deps) and runs every GPU path within
# 10 minutes; gpu-proof/report.md and report.json say what ran, what was missing and what failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3)}"
[ -x /opt/torch/.venv/bin/python3 ] && [ -z "${PYTHON:-}" ] && PY=/opt/torch/.venv/bin/python3
exec timeout 590 "$PY" bench/gpu_proof.py "$@"
