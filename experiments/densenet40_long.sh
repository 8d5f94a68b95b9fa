#!/usr/bin/env bash
# The DenseNet-40 baseline trained in one run from scratch: 40 cosine epochs (hours on 2 CPU
# cores, so several sittings). The run's state can travel in the repository between sittings:
# checkpoints/densenet40-fmnist/long-run/ holds its metrics.jsonl and train.log (the run's output,
# which OUT/train.log collects) and, while the run is unfinished, its last.ckpt (weights,
# momentum, every epoch's metrics). The committed baseline is this run's model.kse.
#
#   bash experiments/densenet40_long.sh        # run or continue: from OUT if it is ahead, else from a saved last.ckpt
#   bash experiments/densenet40_long.sh save   # copy OUT's state into the repository (after an epoch ends)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/densenet40-long}
SAVED=checkpoints/densenet40-fmnist/long-run
epochs_in() { if [ -f "$1/metrics.jsonl" ]; then grep -c '"train_loss"' "$1/metrics.jsonl" || true; else echo 0; fi; }

if [ "${1:-}" = save ]; then
  [ -f "$OUT/last.ckpt" ] || { echo "no $OUT/last.ckpt to save" >&2; exit 2; }
  mkdir -p "$SAVED"
  cp "$OUT/last.ckpt" "$SAVED/last.ckpt.tmp" && mv "$SAVED/last.ckpt.tmp" "$SAVED/last.ckpt"
  cp "$OUT/metrics.jsonl" "$SAVED/metrics.jsonl"
  [ ! -f "$OUT/train.log" ] || tr '\r' '\n' < "$OUT/train.log" | grep -v -e cpp_extension.py -e '^$' > "$SAVED/train.log"
  echo "saved epoch $(epochs_in "$SAVED") of 40 in $SAVED"
  exit 0
fi

source experiments/lib.sh  # KSE
mkdir -p "$OUT"
if [ -f "$SAVED/last.ckpt" ] && [ "$(epochs_in "$SAVED")" -gt "$(epochs_in "$OUT")" ]; then
  cp "$SAVED/last.ckpt" "$OUT/last.ckpt" && cp "$SAVED/metrics.jsonl" "$OUT/metrics.jsonl"
  cp "$SAVED/train.log" "$OUT/train.log"
  echo "continuing from the saved state: epoch $(epochs_in "$OUT") of 40" >&2
fi
$KSE train --arch densenet40 --dataset fashion-mnist --epochs 40 --lr 0.1 --warmup-epochs 0.5 --batch-size 128 \
  --schedule cosine --weight-decay 1e-4 --amp --no-channels-last --compile --seed 5 --out "$OUT" --resume \
  2>&1 | tee -a "$OUT/train.log"
