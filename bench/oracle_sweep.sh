#!/usr/bin/env bash
# The README's "Against an oracle" sweep: every family's mid model (and DART on mid LLaVA) at budgets
# 0.45 and 0.25, one family at a time, one thread, prefill only. Run it on an idle machine (tests or
# CI beside it move the figures); about 30 minutes on the 2-core CPU box at the default 41 repeats.
# JSON: bench/results/runtime-mid-<family>-oracle-cpu.json, mid LLaVA runtime-mid-oracle-cpu.json,
# DART runtime-mid-dart-oracle-cpu.json.   Usage: bench/oracle_sweep.sh [repeats [results dir]]
# (a re-run into another directory checks a sweep without overwriting it; bench/oracle_table.py DIR
# prints its table).
set -euo pipefail
cd "$(dirname "$0")/.."
repeats="${1:-41}"
results="${2:-bench/results}"
python="${PYTHON:-python}"
run() {  # run <out> <args...>
    local out="$1"; shift
    echo "== $out ($(date -u +%H:%M:%S))"
    "$python" bench/runtime.py "$@" --budgets 0.45,0.25 --decode-tokens 0 --repeats "$repeats" --threads 1 \
        --out "$results/$out" > /dev/null
}
run runtime-mid-oracle-cpu.json --model mid
for family in gemma3 internvl llava-next llava-onevision qwen2-vl qwen2.5-vl qwen3-vl qwen3.5; do
    run "runtime-mid-$family-oracle-cpu.json" --model "mid-$family"
done
run runtime-mid-dart-oracle-cpu.json --model mid --search dart
echo "== done ($(date -u +%H:%M:%S))"
