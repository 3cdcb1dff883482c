#!/usr/bin/env bash
# One command on one H100/H200: prefill/runtime/oracle/decode at real size, random weights, bf16, SDPA.
# JSON under bench/results/runtime-<model>-b<batch>-gpu.json, device named. See bench/gpu.py (--cpu-mid, --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu.py "$@"
