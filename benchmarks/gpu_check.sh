#!/usr/bin/env bash
# CUDA checks and GPU timings, for a machine with one NVIDIA GPU and PyTorch installed:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Runs the CUDA tests, the latency / training-step / compression benchmarks on the GPU, and
# the CLI pipeline (compress -> fine-tune with --amp -> eval) on Fashion-MNIST ($KSE_DATA, or
# FakeData when it is absent). Each step has its own time limit; logs and JSON go to OUT_DIR.
set -u
OUT_DIR=${1:-runs/gpu-check}
mkdir -p "$OUT_DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
  tail -n 25 "$OUT_DIR/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step pytest_cuda 100 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_deploy.py tests/test_conv.py
step latency 130 $py benchmarks/latency.py --device cuda --models resnet56 resnet50 --repeats 30 --no-layers
step train_step 60 $py benchmarks/train_step.py --device cuda --batch-size 256 --steps 10 --profile
step compress_speed 40 $py benchmarks/compress_speed.py --device cuda --layers 1
if [ -n "${KSE_DATA:-}" ]; then DATA=(--dataset fashion-mnist); else DATA=(--dataset fake); fi
step cli_compress 40 $py -m kse compress --checkpoint checkpoints/resnet56-fmnist.kse --G 4 --out "$OUT_DIR/g4.kse"
step cli_finetune 90 $py -m kse finetune --checkpoint "$OUT_DIR/g4.kse" "${DATA[@]}" --epochs 1 --amp \
  --batch-size 128 --device cuda --out "$OUT_DIR/g4-ft"
step cli_eval 40 $py -m kse eval --checkpoint "$OUT_DIR/g4-ft/model.kse" "${DATA[@]}" --device cuda --json
