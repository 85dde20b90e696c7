#!/usr/bin/env bash
# Every GPU benchmark of BENCHMARKS.md on one card, in at most 9 minutes (H100/H200):
# the card's bf16 matmul rate, the dataset decode, `cnnlab train --recipe seed --epochs 20`, the fast
# recipe at two lengths (scored with and without flip TTA), the airbench recipe (with and without its
# six-view TTA), and ResNet-18 model FLOPs utilisation.
# Prints a table and writes benchmarks/results/gpu-YYYYMMDD.json.
#
#   benchmarks/gpu.sh [--dry-run] [DATASET.tar.gz]
#
#   DATASET.tar.gz   the CIFAR-10 JPEG archive (or CNNLAB_BENCH_DATASET; default ../shared/datasets/cifar10-jpeg.tar.gz)
#   --dry-run        every row on the CPU at tiny sizes, on the bundled sample (or CNNLAB_BENCH_DRY=1)
#   PYTHON           the interpreter (default: .venv/bin/python if present, else python3); needs torch,
#                    torchvision, tensorboard, tqdm, matplotlib; cnnlab itself is taken from src/
#   CNNLAB_BENCH_SEED_FLAGS, CNNLAB_BENCH_FAST_FLAGS, CNNLAB_BENCH_AIRBENCH_FLAGS
#                                                      extra `cnnlab train` flags for those rows (e.g. --compile)
#   CNNLAB_BENCH_FAST_LONG_EPOCHS                      epochs of the longer fast row (default 40)
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) args+=(--dry-run) ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) args+=(--dataset "$arg") ;;
  esac
done
if [[ -n "${CNNLAB_BENCH_DATASET:-}" && ! " ${args[*]:-} " =~ " --dataset " ]]; then
  args+=(--dataset "$CNNLAB_BENCH_DATASET")
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"
# 9 minutes of rows (the script keeps its own budget) plus a little for start-up and the table.
exec timeout 570 "$PYTHON" -m benchmarks.gpu "${args[@]}"
