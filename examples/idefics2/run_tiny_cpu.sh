#!/usr/bin/env bash
# The main job on a CPU-only machine: a tiny random Idefics2 checkpoint, then the Megatron model
# built from it at tensor parallel 2 x pipeline parallel 2 (4 gloo ranks) checked against transformers.
# Usage: bash examples/idefics2/run_tiny_cpu.sh [OUTPUT_DIR]   (default runs/tiny_cpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/tiny_cpu}
TOOLS=toolkits/model_checkpoints_convertor/idefics2

python "$TOOLS/make_tiny_checkpoint.py" --save-path "$OUT/hf" --text mistral
torchrun --nproc-per-node 4 "$TOOLS/check_hf_parity.py" --hf-path "$OUT/hf" \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --num-images 3 \
    --save-outputs "$OUT/parity_outputs.pt"
