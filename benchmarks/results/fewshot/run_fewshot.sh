#!/usr/bin/env bash
# The runs of benchmarks/results/fewshot/README.md: few-shot sentiment on SmolLM2-135M (CPU).
# Usage: benchmarks/results/fewshot/run_fewshot.sh [DATASET ...]   (run from the repository root; default
#   sst-binary cfimdb). OUT (default /tmp/adaptune-fewshot/runs) holds the runs; a run already finished there is
#   skipped, so the script can be stopped and started again. Then make_report.sh writes the table.
# Every trained run: LM-BFF's protocol, K = 16 per class, a 32-example dev set, seeds 0-4, 100 steps of 8, dev
# every 25 steps (the best dev checkpoint is tested), LoRA r = 8 on the attention (the method's default rate),
# the test set a seeded subset of TEST_LIMIT examples of the dataset's dev file (the same for every run), and
# the self-ensemble (the average of the components over the last 10 snapshots, 5 steps apart) tested beside it.
set -uo pipefail
OUT=${OUT:-/tmp/adaptune-fewshot/runs}
ADAPTUNE=${ADAPTUNE:-adaptune}
TEST_LIMIT=${TEST_LIMIT:-400}
COMMON=(--threads 2 --test-limit "$TEST_LIMIT" --out "$OUT")
TRAIN=(--k 16 --seeds 0,1,2,3,4 --steps 100 --eval-every 25 --method lora --r 8 --self-ensemble 10 --ensemble-every 5)
run() {
  local name=$1; shift
  if [ -f "$OUT/$name/results.json" ]; then echo "=== already there: $name"; return; fi
  echo "=== $name ($(date -u +%H:%M:%S))"
  $ADAPTUNE run fewshot "${COMMON[@]}" --name "$name" "$@" || echo "=== FAILED: $name"
}
tapt() {  # an incomplete directory (no components beside tapt.json) is made again
  local ds=$1 dir=$OUT/tapt-$1
  [ -f "$dir/tapt.json" ] && [ -f "$dir/adaptation.safetensors" ] && return
  echo "=== tapt-$ds ($(date -u +%H:%M:%S))"
  $ADAPTUNE tapt --threads 2 --dataset "$ds" --method lora --r 8 --steps 100 --out "$dir" --overwrite || echo "=== FAILED: tapt-$ds"
}
DATASETS=("$@")
[ $# -eq 0 ] && DATASETS=(sst-binary cfimdb)
for ds in "${DATASETS[@]}"; do  # the rows the lecture asks for, dataset by dataset
  run "$ds-zero-shot" --dataset "$ds" --mode zero-shot
  run "$ds-prompt-lora" --dataset "$ds" --mode prompt "${TRAIN[@]}"
  run "$ds-head-lora" --dataset "$ds" --mode head "${TRAIN[@]}"
  tapt "$ds"
  run "$ds-prompt-lora-tapt" --dataset "$ds" --mode prompt "${TRAIN[@]}" --init-from "$OUT/tapt-$ds"
  run "$ds-prompt-lora-sd1" --dataset "$ds" --mode prompt "${TRAIN[@]}" --self-distill 1
  run "$ds-prompt-lora-nf4" --dataset "$ds" --mode prompt "${TRAIN[@]}" --quantize nf4  # the base in 4 bits
done
for ds in "${DATASETS[@]}"; do  # the head's recipes
  run "$ds-head-lora-sd1" --dataset "$ds" --mode head "${TRAIN[@]}" --self-distill 1
  run "$ds-head-lora-tapt" --dataset "$ds" --mode head "${TRAIN[@]}" --init-from "$OUT/tapt-$ds"
done
echo "=== done ($(date -u +%H:%M:%S))"
