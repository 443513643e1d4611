#!/usr/bin/env bash
# The one-shot GPU check: every phase in one call, each writing its results under OUTDIR as it ends.
#
#   bash benchmarks/gpu_check.sh OUTDIR              # on a GPU machine (H100/H200): budgets of 490 s in all
#   bash benchmarks/gpu_check.sh --rehearse OUTDIR   # the same phases on the CPU, tiny shapes: under 3 minutes
#                                                    # (the tests' LoRA cases only; budgets x3 for 2 CPU cores)
#   bash benchmarks/gpu_check.sh --phases 5 OUTDIR   # only the phases listed (default 1,2,3,4; 5 runs only when listed)
#
# It installs nothing: the checkout is put on PYTHONPATH, and the machine's python3 (PYTHON overrides it)
# must have torch, transformers, peft, pytest, hypothesis and ninja. Phases, with their time budgets (seconds):
#   1 environment  (130)  GPU, versions, the extension built for the device    environment.json, build.log
#   2 correctness  (100)  the kernel tests (ADAPTUNE_KERNELS=require; fp32,     tests.log, tests.xml
#                         fp16, bf16) and the routing, half-precision, DoRA, quantized-base (skipped
#                         where bitsandbytes is not installed) and experts' grouped-op model tests on it
#   3 speed        (180)  ops (4096², 8192²), a Llama-1.1B training step,       results.tar (<suite>-<device>.json
#                         mixed-task batches and LoRA / DoRA on nf4 / int8       and .md, targets-<device>.*)
#                         bases beside PEFT; target verdicts
#   4 sweep+experts (80)  seed 002's Table 2 on BERT-base; LoRA on every expert  results.tar, as above
#                         of a Mixtral-8x7B-shaped MoE block beside PEFT
#   5 seed001 (optional;  seed 001's Table 1 at its released settings: a GPT-2-small-shaped LM   seed001.tar
#     $SEED001_BUDGET,    (12 layers, hidden 768, 12 heads) pretrained on the corpora's train splits, then AdaVAE,
#     default 540)        LG and fine-tuning on it, batches of 90, $SEED001_STEPS steps each (22,000 as released;
#                         the first 2,500 before the decoder's adapters train), the test metrics on 1,000
#                         sentences x 100 samples; the corpora from $ADAPTUNE_LM_DATA (default ../shared/data/lm);
#                         each run's results.json, command and log packed into seed001.tar as it ends
# A phase that fails or runs out of time is recorded in check.log and the next one still runs; bench.log
# holds the benchmarks' progress. Eight files at most (the device machine returns at most eight).
# GPU_CHECK_MAX_BUDGET=N caps every phase at N seconds (the tests use it to check the time-out path).
set -uo pipefail
set -m  # every background job in a process group of its own: a phase's budget ends all of its processes

rehearse=0
phases=1,2,3,4
usage="usage: bash benchmarks/gpu_check.sh [--rehearse] [--phases N,N,...] OUTDIR   (phases 1-5; default 1,2,3,4)"
while [ $# -gt 1 ]; do
  case $1 in
    --rehearse) rehearse=1; shift;;
    --phases) phases=${2:-}; shift 2;;
    *) break;;
  esac
done
if [ $# -ne 1 ] || ! [[ $phases =~ ^[1-5](,[1-5])*$ ]]; then
  echo "$usage" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ $rehearse = 1 ]; then  # two slow CPU cores instead of a GPU machine: thrice the time, the LoRA tests only
  DEVICE=cpu; BENCH=(--tiny --quick --warm 0 --reps 2); SCALE=3; SELECT=(-k lora)
else
  DEVICE=cuda; BENCH=(--warm 3 --reps 10); SCALE=1; SELECT=()
fi
: > "$OUT/check.log"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/check.log"; }
failed=0

# phase NUMBER NAME BUDGET COMMAND...: runs COMMAND (a function too) for at most BUDGET seconds, in a process group
# of its own that is ended whole at the budget (workers included), and records how it ended
phase() {
  local number=$1 name=$2 budget=$(( $3 * SCALE )); shift 3
  [[ ,$phases, == *,$number,* ]] || return 0
  budget=$(( budget < ${GPU_CHECK_MAX_BUDGET:-$budget} ? budget : ${GPU_CHECK_MAX_BUDGET:-$budget} ))
  local start=$SECONDS rc
  log "phase $number $name: started (budget ${budget} s)"
  "$@" &
  local pid=$!
  ( sleep "$budget"; touch "$STAGE/.timeout-$number"; kill -TERM -- "-$pid" 2>/dev/null; sleep 10
    kill -KILL -- "-$pid" 2>/dev/null ) > /dev/null 2>&1 &
  local watchdog=$!
  wait "$pid"
  rc=$?
  kill -- "-$watchdog" 2>/dev/null
  wait "$watchdog" 2>/dev/null
  local took=$(( SECONDS - start ))
  if [ -e "$STAGE/.timeout-$number" ]; then
    log "phase $number $name: TIMED OUT after ${took} s"; failed=1
  elif [ $rc = 0 ]; then
    log "phase $number $name: ok in ${took} s"
  else
    log "phase $number $name: FAILED (exit $rc) in ${took} s"; failed=1
  fi
}

bench() {  # the suites given, one after another, packed into results.tar after each
  local suite
  for suite in "$@"; do
    "$PY" -m benchmarks --device "$DEVICE" --suite "$suite" "${BENCH[@]}" --out "$STAGE" > "$STAGE/.last" 2>&1
    local rc=$?
    cat "$STAGE/.last" >> "$OUT/bench.log"
    tar -cf "$OUT/results.tar" -C "$STAGE" --exclude './.*' . || return 1
    # the verdicts the run printed last: every target of the device, from every suite measured so far
    grep -E '^(PASS|FAIL|MISSING) ' "$STAGE/.last" > "$STAGE/.verdicts"
    [ $rc = 0 ] || { echo "suite $suite: exit $rc (see bench.log)"; return $rc; }
  done
}

tests() {
  local parallel=()
  if [ $rehearse = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
  ADAPTUNE_KERNELS=require ADAPTUNE_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    "${SELECT[@]}" --junitxml="$OUT/tests.xml" tests/test_kernels.py tests/test_kernels_routed.py tests/test_kernels_half.py \
    tests/test_routing.py tests/test_half_precision.py tests/test_dora.py tests/test_quantized.py \
    tests/test_experts_grouped.py > "$OUT/tests.log" 2>&1
  local rc=$?
  tail -n 1 "$OUT/tests.log"
  return $rc
}

seed001() {  # phase 5: pretrain the base, then AdaVAE, LG and fine-tuning on it, one after another
  local runs="$STAGE/seed001" data=${ADAPTUNE_LM_DATA:-$ROOT/../shared/data/lm} steps after v pretrain vae extra
  if [ ! -d "$data/yelp" ]; then
    echo "seed001: no corpora at $data (it reads yelp/, ptb/ and wikitext-2/ there; set ADAPTUNE_LM_DATA)"; return 2
  fi
  export ADAPTUNE_LM_DATA=$data
  mkdir -p "$runs"
  if [ $rehearse = 1 ]; then
    steps=${SEED001_STEPS:-6}
    pretrain=(--layers 2 --hidden 64 --heads 2 --vocab 512 --steps 5 --train-limit 200 --eval-limit 20)
    vae=(--batch-size 8 --train-limit 64 --eval-limit 8 --eval-samples 4 --adapter-dim 8)
  else
    steps=${SEED001_STEPS:-22000}
    pretrain=(--layers 12 --hidden 768 --heads 12 --steps "${SEED001_PRETRAIN_STEPS:-2000}")
    vae=(--batch-size 90 --eval-limit 1000 --eval-samples 100)
  fi
  after=$("$PY" -c "print(min(2500 / $steps, 1 / 6))")  # the decoder joins after 2,500 steps, as released
  # packs what has ended (settings, results, logs; no weights) into seed001.tar: after every step, failed too
  pack() { tar -cf "$OUT/seed001.tar" -C "$runs" --exclude '*.safetensors' --exclude ./base .; }
  "$PY" -m cli.app pretrain-lm --out "$runs/base" --device "$DEVICE" "${pretrain[@]}" > "$runs/pretrain.log" 2>&1
  [ -f "$runs/base/pretrain.json" ] && cp "$runs/base/pretrain.json" "$runs/"
  pack
  [ -f "$runs/pretrain.json" ] || { tail -n 3 "$runs/pretrain.log"; return 1; }
  for v in adavae lg finetune; do
    case $v in finetune) extra=(--finetune --lr 1e-4);; lg) extra=(--latent-gen pool --lr 1e-3);; *) extra=(--lr 1e-3);; esac
    "$PY" -m cli.app run vae --base "$runs/base" --device "$DEVICE" --steps "$steps" --decoder-after "$after" \
      "${vae[@]}" --seed 0 --out "$runs" --name "$v" "${extra[@]}" > "$runs/$v.log" 2>&1
    pack
    [ -f "$runs/$v/results.json" ] || { tail -n 3 "$runs/$v.log"; return 1; }
    log "phase 5 seed001: $v ended, test $(grep -o '"ppl": [0-9.]*' "$runs/$v/results.json" | head -n 1)"
  done
}

where=$([ $rehearse = 1 ] && echo "rehearsal on the CPU" || echo "on $DEVICE")
log "gpu_check: $where, checkout $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
phase 1 environment 130 "$PY" -m benchmarks.gpu_check "$OUT" "$DEVICE"
phase 2 correctness 100 tests
phase 3 speed 180 bench ops train routing quantized  # quantized last: a time-out keeps the others
phase 4 sweep-experts 80 bench sweep experts
phase 5 seed001 "${SEED001_BUDGET:-540}" seed001
if [ -s "$STAGE/.verdicts" ]; then log "target verdicts:"; tee -a "$OUT/check.log" < "$STAGE/.verdicts"; fi
log "gpu_check: done, $([ $failed = 0 ] && echo every phase ok || echo 'some phases failed (above)')"
exit $failed
