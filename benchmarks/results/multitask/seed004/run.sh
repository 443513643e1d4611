#!/usr/bin/env bash
# Seed 004's headline claims at the medium budget of ../medium/README.md, three seeds each:
#  - at an equal budget of parameters updated per task, task-specific Adapters beat LoRA: LoRA r = 12 (shared,
#    0.73% per task) against Adapter width 18 (per task, about the same share);
#  - LoRA+Adapter (shared LoRA r = 8, per-task adapters of width 32) comes close to full fine-tuning.
# Usage: benchmarks/results/multitask/seed004/run.sh [OUT]   (run from the repository root)
# Each run: sst + para + sts, seeded subsets of 2048 train / 800 dev examples per dataset (--data-seed 0), 2 epochs,
# batches of 16, at most 64 tokens, one torch thread; learning rates as in ../medium (components 3e-3, full 3e-4,
# heads 3e-3). Seed-major, so every finished seed is a whole comparison. Resumable: a run whose results.json
# exists in OUT, or whose file is already in per-run/ here, is skipped; each finished run's results.json is
# copied to per-run/ here.
set -uo pipefail
OUT=${1:-/tmp/adaptune-multitask/seed004}
ADAPTUNE=${ADAPTUNE:-adaptune}
HERE=benchmarks/results/multitask/seed004
COMMON=(--quick --train-limit 2048 --dev-limit 800 --epochs 2 --data-seed 0 --threads 1 --out "$OUT")
mkdir -p "$HERE/per-run"
run() {  # run NAME SEED ARGS...
  local name="$1-seed$2" seed="$2"
  shift 2
  [ -f "$HERE/per-run/$name.json" ] && return
  if [ ! -f "$OUT/$name/results.json" ]; then
    echo "=== $name ($(date -u +%H:%M:%S))"
    $ADAPTUNE run multitask "${COMMON[@]}" --seed "$seed" --name "$name" "$@" > /dev/null || { echo "=== FAILED: $name"; return; }
  fi
  cp "$OUT/$name/results.json" "$HERE/per-run/$name.json"
}
for seed in 0 1 2; do
  run lora-r12 "$seed" --method lora --r 12 --lr 3e-3
  run adapter-dim18 "$seed" --method adapter --dim 18 --lr 3e-3
  run lora+adapter-r8-dim32 "$seed" --method lora+adapter --r 8 --dim 32 --lr 3e-3
  run full "$seed" --method full --lr 3e-4
done
echo "=== done ($(date -u +%H:%M:%S))"
