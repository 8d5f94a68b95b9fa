#!/usr/bin/env bash
# The equal-budget experiment of docs/budget.md: the Fashion-MNIST ResNet-56 baseline cut to
# several MAC budgets by KSE with one global G/T (the paper's rule: the nearest global setting
# under the budget), KSE with the per-layer allocation, L1 filter pruning with one ratio in
# every block (Li et al. 2017) and Torch-Pruning's global group-magnitude pruning, every model
# fine-tuned with the same recipe (the sweep's: 150 steps, lr 0.01, x0.1 at half). Every step is
# skipped when its output exists, so an interrupted run continues where it stopped. Then
# experiments/budget_collect.py measures and tabulates everything.
#
#   BASE=checkpoints/resnet56-fmnist.kse OUT=runs/budget BUDGETS="1.6x 2x 2.5x 3x" bash experiments/budget_resnet56.sh
#   RUN=ep3 EPOCHS=3 STEPS= BUDGETS=2x bash experiments/budget_resnet56.sh    # the 3-epoch point
set -euo pipefail
BASE=${BASE:-checkpoints/resnet56-fmnist.kse}
OUT=${OUT:-runs/budget}
BUDGETS=${BUDGETS:-"1.6x 2x 2.5x 3x"}
EPOCHS=${EPOCHS:-1}
STEPS=${STEPS-150}   # empty: whole epochs
RUN=${RUN:-short}
FT=(--lr 0.01 --schedule multistep --milestones 0.5 --weight-decay 1e-5 --batch-size 128 --amp --seed 0)
mkdir -p "$OUT"
steps=()
[ -n "$STEPS" ] && steps=(--max-steps "$STEPS")

shrink() {  # name, command and flags (written to $OUT/name.kse)
  local name=$1; shift
  [ -f "$OUT/$name.kse" ] || "$@" --out "$OUT/$name.kse" > "$OUT/$name.txt" 2>&1
}
source "$(dirname "$0")/lib.sh"  # finetune DIR START [flags...]

for b in $BUDGETS; do
  shrink "kse-global-$b" $KSE compress --checkpoint "$BASE" --target-macs "$b" --allocation global
  shrink "kse-layer-$b" $KSE compress --checkpoint "$BASE" --target-macs "$b" --allocation per-layer
  shrink "l1-$b" $KSE prune --checkpoint "$BASE" --method l1 --macs "$b"
  shrink "tp-global-$b" $KSE prune --checkpoint "$BASE" --method tp-global --macs "$b"
done
for b in $BUDGETS; do
  for m in kse-global kse-layer l1 tp-global; do finetune "$RUN-$m-$b" "$m-$b" --epochs "$EPOCHS" "${steps[@]}"; done
done
echo "done: $OUT"
