#!/usr/bin/env bash
# The paper's second network on Fashion-MNIST: the DenseNet-40 (k=12) baseline compressed with
# KSE at G=4, 5 and 6 (T=0) on the layers the paper compresses (every 3x3 convolution of a dense
# layer: not the first convolution, the two 1x1 transitions or the classifier), and
# Torch-Pruning's global group-magnitude pruning of the dense layers' filters at KSE G=6's MACs
# as the peer; every model fine-tuned with the ResNet-56 experiment's recipe (SGD, lr 0.01, x0.1
# at half, weight decay 1e-5, batch 128, bfloat16 autocast). Also the feature-reuse map of the
# baseline (`kse analyze` at G=6). Every step is skipped when its output exists, and fine-tuning
# resumes from its last epoch, so an interrupted run continues where it stopped. Then
# experiments/densenet_collect.py measures and tabulates everything.
#
# The baseline (BASE) comes from one `kse train` run of 40 cosine epochs from scratch (94.67%; it
# takes hours on 2 CPU cores, so experiments/densenet40_long.sh continues it over several sittings
# with --resume; checkpoints/README.md has the earlier 93.90% baseline's stages):
#   kse train --arch densenet40 --dataset fashion-mnist --epochs 40 --lr 0.1 --warmup-epochs 0.5 \
#     --batch-size 128 --schedule cosine --weight-decay 1e-4 --amp --no-channels-last --compile --seed 5 \
#     --out runs/densenet40-long
#
#   BASE=checkpoints/densenet40-fmnist.kse OUT=runs/dn40 EPOCHS=3 bash experiments/fmnist_densenet40.sh
set -euo pipefail
BASE=${BASE:-checkpoints/densenet40-fmnist.kse}
OUT=${OUT:-runs/dn40}
EPOCHS=${EPOCHS:-3}
GS=${GS:-"4 5"}   # besides G=6, the paper's setting (always run: the peer matches its MACs)
# NCHW: DenseNet's faster training layout on this CPU (the layout changes no result)
FT=(--lr 0.01 --schedule multistep --milestones 0.5 --weight-decay 1e-5 --batch-size 128 --amp --seed 0
    --no-channels-last)
# torch.compile the training steps (the same steps, faster on DenseNet; COMPILE=0 without a C++ compiler)
[ "${COMPILE:-1}" = 1 ] && FT+=(--compile)
PAPER_LAYERS=(--exclude features.1.conv features.3.conv)  # the transitions stay dense
mkdir -p "$OUT"

source "$(dirname "$0")/lib.sh"  # finetune DIR START [flags...]

[ -f "$OUT/analyze-g6/feature_reuse.json" ] || $KSE analyze --checkpoint "$BASE" --G 6 "${PAPER_LAYERS[@]}" \
  --out "$OUT/analyze-g6" > "$OUT/analyze-g6.txt"
for G in 6 $GS; do
  [ -f "$OUT/g$G.kse" ] || $KSE compress --checkpoint "$BASE" --out "$OUT/g$G.kse" --G "$G" "${PAPER_LAYERS[@]}" \
    > "$OUT/g$G.compress.txt"
done
[ -f "$OUT/tp-g6.kse" ] || $KSE prune --checkpoint "$BASE" --out "$OUT/tp-g6.kse" --method tp-global \
  --match "$OUT/g6.kse" --layers 'features.*.*.conv' > "$OUT/tp-g6.prune.txt"
# G=6 and its peer fine-tuned further (MORE epochs, cosine from lr 0.01; 0 skips them): 3 epochs
# leave DenseNet-40 short of its accuracy (docs/densenet.md)
MORE=${MORE:-4}
more() { [ "$MORE" -eq 0 ] || finetune "ft-$1-more" "ft-$1/model" --epochs "$MORE" --schedule cosine --seed 1; }
# in the order of what the comparison needs first: KSE G=6 to its accuracy (EPOCHS, then MORE),
# its peer's EPOCHS, the other G, then the peer's MORE
finetune ft-g6 g6 --epochs "$EPOCHS"
more g6
finetune ft-tp-g6 tp-g6 --epochs "$EPOCHS"
for G in $GS; do finetune "ft-g$G" "g$G" --epochs "$EPOCHS"; done
more tp-g6
echo "done: $OUT"
