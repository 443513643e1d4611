#!/usr/bin/env bash
# The CPU comparison of benchmarks/results/multitask/README.md: every method on the same data and budget.
# Usage: benchmarks/results/multitask/run_comparison.sh [OUT]   (run from the repository root)
# Each run is the --quick preset: sst + para + sts, seeded subsets of 512 train / 400 dev examples per
# dataset (--data-seed 0), 1 epoch, batches of 16, at most 64 tokens; seed 0; one CPU thread; the
# methods' default learning rates when it ran (components 1e-3, full 1e-4, prefix 5e-3; heads 3e-3), given
# explicitly below since the defaults became this comparison's winners (components 3e-3, full 3e-4).
set -uo pipefail
OUT=${1:-/tmp/adaptune-multitask/runs}
ADAPTUNE=${ADAPTUNE:-adaptune}
COMMON=(--quick --seed 0 --data-seed 0 --threads 1 --out "$OUT")
run() { echo "=== $* ($(date -u +%H:%M:%S))"; $ADAPTUNE run multitask "${COMMON[@]}" "$@" || echo "=== FAILED: $*"; }

run --method full --lr 1e-4
run --method head-only
run --method lora --r 12 --lr 1e-3
run --method lora+adapter --r 8 --dim 32 --lr 1e-3
run --method adapter --dim 64 --lr 1e-3
run --method dora --r 12 --lr 1e-3
run --method hyper --dim 8 --lr 1e-3
run --method prefix --n 20
for r in 1 4 24; do run --method lora --r $r --lr 1e-3; done
for r in 1 4 24; do run --method dora --r $r --lr 1e-3; done
for d in 16 128; do run --method adapter --dim $d --lr 1e-3; done
# extras: a higher learning rate for LoRA/DoRA (is their gap the short schedule?), and prompt tuning
run --method lora --r 12 --lr 3e-3 --name lora-r12-lr3e-3-seed0
run --method dora --r 12 --lr 3e-3 --name dora-r12-lr3e-3-seed0
run --method prompt --n 20
# second sweep, every learning rate x3 (full 3e-4, components 3e-3; lora/dora r=12 ran above)
x3() { run "$@" --name "$(echo "$*" | sed -e 's/--method //' -e 's/--\([a-z]*\) /\1/g' -e 's/ /-/g')-seed0"; }
x3 --method full --lr 3e-4
for r in 1 4 24; do x3 --method lora --r $r --lr 3e-3; done
for r in 1 4 24; do x3 --method dora --r $r --lr 3e-3; done
for d in 16 64 128; do x3 --method adapter --dim $d --lr 3e-3; done
x3 --method lora+adapter --r 8 --dim 32 --lr 3e-3
x3 --method hyper --dim 8 --lr 3e-3
echo "=== done ($(date -u +%H:%M:%S))"
