#!/usr/bin/env bash
# Seed 002's headline claim at the medium budget of ../medium/README.md: task-specific (per-task) LoRA against
# task-specific DoRA at r = 4, 12, 24, three seeds each (r = 12 first: the claim's rank).
# Usage: benchmarks/results/multitask/per-task/run.sh [OUT]   (run from the repository root)
# Each run: sst + para + sts, seeded subsets of 2048 train / 800 dev examples per dataset (--data-seed 0), 2 epochs,
# batches of 16, at most 64 tokens, components lr 3e-3, heads 3e-3, one torch thread. Resumable: a run whose
# results.json exists in OUT, or whose file is already in per-run/ here, is skipped; each finished run's
# results.json is copied to per-run/ here.
set -uo pipefail
OUT=${1:-/tmp/adaptune-multitask/per-task}
ADAPTUNE=${ADAPTUNE:-adaptune}
HERE=benchmarks/results/multitask/per-task
COMMON=(--quick --train-limit 2048 --dev-limit 800 --epochs 2 --data-seed 0 --threads 1 --per-task --lr 3e-3 --out "$OUT")
mkdir -p "$HERE/per-run"
run() {  # run METHOD R SEED
  local name="$1-r$2-per-task-seed$3"
  [ -f "$HERE/per-run/$name.json" ] && return
  if [ ! -f "$OUT/$name/results.json" ]; then
    echo "=== $name ($(date -u +%H:%M:%S))"
    $ADAPTUNE run multitask "${COMMON[@]}" --method "$1" --r "$2" --seed "$3" --name "$name" > /dev/null || { echo "=== FAILED: $name"; return; }
  fi
  cp "$OUT/$name/results.json" "$HERE/per-run/$name.json"
}
for seed in 0 1 2; do for m in lora dora; do run $m 12 $seed; done; done
for seed in 0 1 2; do for r in 4 24; do for m in lora dora; do run $m $r $seed; done; done; done
echo "=== done ($(date -u +%H:%M:%S))"
