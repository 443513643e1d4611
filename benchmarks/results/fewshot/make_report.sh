#!/usr/bin/env bash
# The table and per-run results of the runs made by run_fewshot.sh.
# Usage: benchmarks/results/fewshot/make_report.sh   (run from the repository root; OUT as for run_fewshot.sh)
set -euo pipefail
OUT=${OUT:-/tmp/adaptune-fewshot/runs}
ADAPTUNE=${ADAPTUNE:-adaptune}
HERE=benchmarks/results/fewshot
mkdir -p "$HERE/per-run"
for d in "$OUT"/*/; do
  if [ -f "$d/results.json" ]; then cp "$d/results.json" "$HERE/per-run/$(basename "$d").json"; fi
  if [ -f "$d/tapt.json" ]; then cp "$d/tapt.json" "$HERE/per-run/$(basename "$d").json"; fi
done
COLUMNS=200 $ADAPTUNE report "$OUT"/*/ --markdown "$HERE/table.md"
