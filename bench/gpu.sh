#!/usr/bin/env bash
# The GPU benchmark, as one prepared script (under 8 minutes on one H100): the training step (paper
# config, every variant as a ratio to fp32 eager, with counted FLOPs and MFU), the data stream, and
# sampling. Everything goes to one log: bench/gpu-<date>.log (or $1).
#   bash bench/gpu.sh [LOG]            (DEVICE=cpu bash bench/gpu.sh: the same on CPU, slowly)
set -euo pipefail
cd "$(dirname "$0")/.."
log=${1:-bench/gpu-$(date +%Y%m%d-%H%M).log}
device=${DEVICE:-cuda}
{
  echo "# bench/gpu.sh $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo; echo "## train_step (batch 32, patch 160)"
  timeout 300 python bench/train_step.py --device "$device" --batch 32 --patch 160 --steps 10 --warmup 3 --variants all
  echo; echo "## stream (CPU workers feeding the GPU; device upsampling on cuda)"
  timeout 120 python bench/stream.py --device "$device" --workers 4 --no-write
  echo; echo "## sample (LR 64x64 -> 256x256, bf16)"
  timeout 120 python bench/sample.py --device "$device" --lr-size 64 --batch 16 --precision bf16
} 2>&1 | tee "$log"
echo "log: $log"
