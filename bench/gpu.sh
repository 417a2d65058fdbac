#!/usr/bin/env bash
# Parity and speed on a lent GPU in one command (meant to finish in under 8 minutes):
#
#   bash bench/gpu.sh [SIZES] [OUT]        default: 1024,2048,4096 and bench-gpu.txt
#
# 1. every reference case through Stylizer on the device, at float32 (the default) and at each
#    opt-in precision: largest difference from the original code's outputs;
# 2. bench/model.py: ours (cached style, folded transform, batches of 1 and 8, each precision)
#    against the original algorithm at each size: images/s, peak memory, difference from the
#    original in 8-bit levels and the network's round-trip error.
# Without CUDA it runs on the CPU with float32 and bf16 only (give small sizes: `bash
# bench/gpu.sh 128`). CONTENTS (default 8) sets the number of contents per size;
# PARITY_MAX_SIZE (default 0: all) skips parity cases above that size; COMPILE=1 adds
# torch.compile rows (batch 1, each precision; compiling takes minutes, mind the time).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-1024,2048,4096}
OUT=${2:-bench-gpu.txt}
CONTENTS=${CONTENTS:-8}
PARITY_MAX_SIZE=${PARITY_MAX_SIZE:-0}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
  PRECISIONS=${PRECISIONS:-float32,tf32,bf16,fp16}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  DEVICE=cpu
  PRECISIONS=${PRECISIONS:-float32,bf16}
fi
{
  echo "# bench/gpu.sh on $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC'), sizes $SIZES"
  for p in ${PRECISIONS//,/ }; do
    echo "## parity of the reference cases, precision $p"
    python bench/parity.py --device "$DEVICE" --precision "$p" --max-case-size "$PARITY_MAX_SIZE"
  done
  echo "## speed: ours vs the original algorithm"
  python bench/model.py --device "$DEVICE" --sizes "$SIZES" --batches 1,8 \
    --precisions "$PRECISIONS" --contents "$CONTENTS" ${COMPILE:+--compile}
} 2>&1 | tee "$OUT"
