#!/usr/bin/env bash
# Mixed-batch training of the comparison's best method (table.md here): LoRA+Adapter (r 8, dim 32, lr 3e-3) at the
# --quick budget of run_comparison.sh, round robin and --batching mixed side by side, seed 0, one CPU thread.
# Usage: benchmarks/results/multitask/mixed/run.sh [OUT]   (run from the repository root)
set -euo pipefail
OUT=${1:-/tmp/adaptune-multitask/mixed}
ADAPTUNE=${ADAPTUNE:-adaptune}
COMMON=(--quick --seed 0 --data-seed 0 --threads 1 --out "$OUT" --method lora+adapter --r 8 --dim 32 --lr 3e-3)
for b in round-robin mixed; do
  [ -f "$OUT/$b/results.json" ] || $ADAPTUNE run multitask "${COMMON[@]}" --batching "$b" --name "$b"
done
COLUMNS=200 $ADAPTUNE report "$OUT"/round-robin "$OUT"/mixed --plot "$OUT/report.png" --markdown benchmarks/results/multitask/mixed/table.md
cp "$OUT/round-robin/results.json" benchmarks/results/multitask/mixed/per-run/round-robin.json
cp "$OUT/mixed/results.json" benchmarks/results/multitask/mixed/per-run/mixed.json
