#!/usr/bin/env bash
# The CPU experiments of benchmarks/results/vae/README.md (seed 001's Tables 1-3 and Figure 1, scaled down).
# Usage: benchmarks/results/vae/run_tables.sh [OUT] [PART]   (from the repository root; PART: t1, t2, t3, smol,
# long, smol-long or all). The base is small-gpt2 (`adaptune pretrain-lm`, built first when missing); every run: Yelp unless
# named, seed 0, batches of 32 sentences of at most 32 tokens, $STEPS steps, test metrics on a seeded subset of
# $EVAL_LIMIT test sentences with $EVAL_SAMPLES importance samples; components at lr 1e-3, full fine-tuning 1e-4.
set -uo pipefail
OUT=${1:-runs/vae}
PART=${2:-all}
ADAPTUNE=${ADAPTUNE:-adaptune}
STEPS=${STEPS:-400}
EVAL_LIMIT=${EVAL_LIMIT:-300}
EVAL_SAMPLES=${EVAL_SAMPLES:-100}
THREADS=${THREADS:-2}
COMMON=(--base small-gpt2 --steps "$STEPS" --batch-size 32 --eval-limit "$EVAL_LIMIT" --eval-samples "$EVAL_SAMPLES"
        --seed 0 --threads "$THREADS" --out "$OUT")
run() { local name=$1; shift; echo "=== $name: $* ($(date -u +%H:%M:%S))"
        [ -f "$OUT/$name/results.json" ] && { echo "=== $name: done before"; return; }
        $ADAPTUNE run vae "${COMMON[@]}" --name "$name" "$@" || echo "=== FAILED: $name"; }
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

case $PART in smol|smol-long) ;;  # SmolLM2 comes from PyPI; the other parts need small-gpt2
  *) $ADAPTUNE pretrain-lm --threads "$THREADS";;  # prints the cached model's held-out PPL when it is built already
esac
if want t1; then  # Table 1: ablations at λ = 0.5
  run adavae --lr 1e-3
  run finetune --finetune --lr 1e-4
  run lg --latent-gen pool --lr 1e-3
  run lg-minus-psa-plus-atm --latent-gen pool --injection atm --lr 1e-3
  run lg-plus-atm --latent-gen pool --injection both --lr 1e-3
  run prefix --prefix 30 --lr 1e-3
  run parallel-attn --placement attn-parallel --lr 1e-3
  run sequential-attn --placement attn-serial --lr 1e-3
fi
if want t2; then  # Table 2: the λ sweep (λ = 0.5 is Table 1's adavae), and PTB
  for fb in 0.05 0.1 0.25 0.75; do run "adavae-fb$fb" --free-bits "$fb" --lr 1e-3; done
  run ptb-adavae --corpus ptb --lr 1e-3
fi
if want t3; then  # Table 3 / Figure 1: latent classification on the AdaVAE run
  $ADAPTUNE vae classify --run "$OUT/adavae" --dataset yelp --threads "$THREADS"
  $ADAPTUNE vae classify --run "$OUT/adavae" --dataset sst --labels 10,100,1000,10000 --threads "$THREADS"
fi
if want smol; then  # AdaVAE against LG on SmolLM2-135M at a budget that fits a 2-core CPU
  SMOL=(--base smollm2-135m --steps "${SMOL_STEPS:-60}" --batch-size 8 --train-limit 4000 --eval-limit 100
        --eval-samples 20 --seed 0 --threads "$THREADS" --out "$OUT" --lr 1e-3)
  for v in adavae lg; do
    [ -f "$OUT/smol-$v/results.json" ] && continue
    echo "=== smol-$v ($(date -u +%H:%M:%S))"
    $ADAPTUNE run vae "${SMOL[@]}" --name "smol-$v" $([ $v = lg ] && echo --latent-gen pool) || echo "=== FAILED: smol-$v"
  done
fi
if want long; then  # a learning-rate check, and AdaVAE, fine-tuning and LG at 6x the budget ($LONG_STEPS steps)
  run adavae-lr3e-3 --lr 3e-3
  for v in adavae finetune lg; do
    case $v in finetune) extra=(--finetune --lr 1e-4);; lg) extra=(--latent-gen pool --lr 1e-3);; *) extra=(--lr 1e-3);; esac
    run "$v-long" --steps "${LONG_STEPS:-2400}" "${extra[@]}"
  done
fi
if [ "$PART" = smol-long ]; then  # seed 001's Table 1 on a GPT-2-small-sized base: AdaVAE, LG and fine-tuning on
  # SmolLM2-135M at $SMOL_LONG_STEPS steps (the smol part's 60 steps trained in 85 s on two threads), one run at a time,
  # resumable by run (a finished run is skipped); not part of "all"
  SMOL=(--base smollm2-135m --steps "${SMOL_LONG_STEPS:-1200}" --batch-size 8 --train-limit 20000 --eval-limit 300
        --eval-samples 50 --seed 0 --threads "$THREADS" --out "$OUT")
  for v in adavae lg finetune; do
    case $v in finetune) extra=(--finetune --lr 1e-4);; lg) extra=(--latent-gen pool --lr 1e-3);; *) extra=(--lr 1e-3);; esac
    [ -f "$OUT/smol-long-$v/results.json" ] && continue
    echo "=== smol-long-$v ($(date -u +%H:%M:%S))"
    $ADAPTUNE run vae "${SMOL[@]}" --name "smol-long-$v" "${extra[@]}" || echo "=== FAILED: smol-long-$v"
  done
fi
echo "=== done ($(date -u +%H:%M:%S))"
