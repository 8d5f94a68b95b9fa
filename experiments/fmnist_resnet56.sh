#!/usr/bin/env bash
# The Fashion-MNIST experiment of the README: KSE G=4 / G=5 against L1 filter pruning at
# KSE G=4's MACs, all fine-tuned with the same budget; the same three with their BatchNorm
# statistics recalibrated and no fine-tuning; a G=3..6 sweep with L1 peers at matching MACs;
# the ablation (sparsity alone, entropy alone, official entropy layout).
# Every step is skipped when its output exists, so an interrupted run continues where it
# stopped. Then experiments/collect.py measures and tabulates everything.
#
#   BASE=checkpoints/resnet56-fmnist.kse OUT=runs/exp EPOCHS=4 SWEEP_STEPS=200 bash experiments/fmnist_resnet56.sh
#
# RECALIBRATED_ONLY=1 stops after the "recalibrated, no fine-tuning" models and their
# evaluations (minutes, no training); RECAL sets their number of training batches (100).
set -euo pipefail
BASE=${BASE:-checkpoints/resnet56-fmnist.kse}
OUT=${OUT:-runs/exp}
EPOCHS=${EPOCHS:-4}            # main runs: epochs of fine-tuning (the paper's recipe, lr x0.1 at half)
SWEEP_STEPS=${SWEEP_STEPS:-200} # sweep and ablation: steps of fine-tuning (one epoch, capped)
FT=(--lr 0.01 --schedule multistep --milestones 0.5 --weight-decay 1e-5 --batch-size 128 --amp --seed 0)
RECAL=${RECAL:-100}            # recalibrated models: training batches of 128 images (no labels, no gradients)
mkdir -p "$OUT"

compress() {  # name, flags...
  local name=$1; shift
  [ -f "$OUT/$name.kse" ] || $KSE compress --checkpoint "$BASE" --out "$OUT/$name.kse" "$@" > "$OUT/$name.compress.txt"
}
l1() {  # name, matched KSE name
  [ -f "$OUT/$1.kse" ] || $KSE prune-l1 --checkpoint "$BASE" --out "$OUT/$1.kse" --match "$OUT/$2.kse" > "$OUT/$1.prune.txt"
}
source "$(dirname "$0")/lib.sh"  # finetune DIR START [flags...]

evaluate() {  # name [file]: test-set accuracy of $OUT/name.kse (or file) as JSON, renamed into place once complete
  [ -f "$OUT/$1.eval.json" ] && return
  $KSE eval --checkpoint "${2:-$OUT/$1.kse}" --json --repeats 1 --warmup 0 > "$OUT/$1.eval.json.part"
  mv "$OUT/$1.eval.json.part" "$OUT/$1.eval.json"
}

# the main models, then the same with recalibrated BatchNorm statistics, no fine-tuning
for G in 4 5; do compress "g$G" --G "$G"; done
l1 "l1-g4" "g4"
compress "rc-g4" --G 4 --recalibrate "$RECAL"
compress "rc-g5" --G 5 --recalibrate "$RECAL"
[ -f "$OUT/rc-l1-g4.kse" ] || $KSE prune-l1 --checkpoint "$BASE" --out "$OUT/rc-l1-g4.kse" --match "$OUT/g4.kse" \
  --recalibrate "$RECAL" > "$OUT/rc-l1-g4.prune.txt"
evaluate baseline "$BASE"
for run in g4 g5 l1-g4 rc-g4 rc-g5 rc-l1-g4; do evaluate "$run"; done
if [ "${RECALIBRATED_ONLY:-0}" = 1 ]; then echo "done (recalibrated, no fine-tuning): $OUT"; exit 0; fi

for G in 3 4 5 6; do compress "g$G" --G "$G"; l1 "l1-g$G" "g$G"; done
compress "g4-sparsity" --G 4 --score sparsity
compress "g4-entropy" --G 4 --score entropy
compress "g4-official" --G 4 --entropy-layout official

# main runs: equal budgets
for run in g4 g5 l1-g4; do finetune "ft-$run" "$run" --epochs "$EPOCHS"; done
# sweep and ablation: equal (short) budgets
for run in g3 g4 g5 g6 l1-g3 l1-g4 l1-g5 l1-g6 g4-sparsity g4-entropy g4-official; do
  finetune "short-$run" "$run" --epochs 1 --max-steps "$SWEEP_STEPS"
done
echo "done: $OUT"
