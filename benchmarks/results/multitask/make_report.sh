#!/usr/bin/env bash
# Table, plot and per-run results of the comparison made by run_comparison.sh (or medium/run_comparison.sh).
# Usage: benchmarks/results/multitask/make_report.sh [OUT] [HERE]   (run from the repository root)
#   OUT: the runs' directory; HERE: where the report goes (benchmarks/results/multitask or .../medium)
set -euo pipefail
OUT=${1:-/tmp/adaptune-multitask/runs}
ADAPTUNE=${ADAPTUNE:-adaptune}
HERE=${2:-benchmarks/results/multitask}
mkdir -p "$HERE/per-run"
for d in "$OUT"/*/; do
  name=$(basename "$d")
  [ -f "$d/results.json" ] || continue
  cp "$d/results.json" "$HERE/per-run/$name.json"
done
COLUMNS=200 $ADAPTUNE report "$OUT"/* --plot "$HERE/dev_vs_params.png" --markdown "$HERE/table.md"
