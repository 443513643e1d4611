#!/usr/bin/env bash
# The main README's `--quick` job at its defaults: `adaptune run multitask --quick` (LoRA+Adapter: shared LoRA r 12
# on q, k, v, per-task adapters of width 64; lr 3e-3; seed 0), one CPU thread; its results.json is default.json here.
# Usage: benchmarks/results/multitask/quick/run.sh [OUT]   (run from the repository root)
set -euo pipefail
OUT=${1:-/tmp/adaptune-multitask/quick}
ADAPTUNE=${ADAPTUNE:-adaptune}
$ADAPTUNE run multitask --quick --threads 1 --out "$OUT" --name default --overwrite
cp "$OUT/default/results.json" benchmarks/results/multitask/quick/default.json
