#!/usr/bin/env bash
# The medium-budget CPU comparison of benchmarks/results/multitask/medium/README.md: the leading methods
# of the quick-budget comparison (../README.md) with 4x the training data and 2 epochs (8x the steps).
# Usage: benchmarks/results/multitask/medium/run_comparison.sh [OUT]   (run from the repository root)
# Two queues run side by side, one torch thread each (a 2-core machine); each run: sst + para + sts,
# seeded subsets of 2048 train / 800 dev examples per dataset (--data-seed 0), 2 epochs, batches of 16,
# at most 64 tokens; seed 0; learning rates: full 3e-4, components 3e-3 (the better sweep of ../README.md),
# prefix at its default 5e-3, heads 3e-3.
set -uo pipefail
OUT=${1:-/tmp/adaptune-multitask/medium}
ADAPTUNE=${ADAPTUNE:-adaptune}
COMMON=(--quick --train-limit 2048 --dev-limit 800 --epochs 2 --seed 0 --data-seed 0 --threads 1 --out "$OUT")
run() { echo "=== $* ($(date -u +%H:%M:%S))"; $ADAPTUNE run multitask "${COMMON[@]}" "$@" > /dev/null || echo "=== FAILED: $*"; }
queue_a() {
  run --method full --lr 3e-4 --name full-lr3e-4
  run --method lora+adapter --r 8 --dim 32 --lr 3e-3 --name lora+adapter-r8-dim32-lr3e-3
  run --method lora --r 12 --lr 3e-3 --name lora-r12-lr3e-3
  run --method prefix --n 20 --name prefix-n20
}
queue_b() {
  run --method head-only --name head-only
  run --method dora --r 24 --lr 3e-3 --name dora-r24-lr3e-3
  run --method lora --r 24 --lr 3e-3 --name lora-r24-lr3e-3
  run --method adapter --dim 64 --lr 3e-3 --name adapter-dim64-lr3e-3
  run --method hyper --dim 8 --lr 3e-3 --name hyper-dim8-lr3e-3
}
queue_a & queue_b & wait
echo "=== done ($(date -u +%H:%M:%S))"
