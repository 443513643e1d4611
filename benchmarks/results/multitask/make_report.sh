#!/usr/bin/env bash
# Table, plot and per-run results of the comparison made by run_comparison.sh.
# Usage: benchmarks/results/multitask/make_report.sh [OUT]   (run from the repository root)
set -euo pipefail
OUT=${1:-/tmp/adaptune-multitask/runs}
ADAPTUNE=${ADAPTUNE:-adaptune}
HERE=benchmarks/results/multitask
mkdir -p "$HERE/per-run"
for d in "$OUT"/*/; do
  name=$(basename "$d")
  [ -f "$d/results.json" ] || continue
  cp "$d/results.json" "$HERE/per-run/$name.json"
done
COLUMNS=200 $ADAPTUNE report "$OUT"/* --plot "$HERE/dev_vs_params.png" --markdown "$HERE/table.md"
