#!/usr/bin/env bash
# The main job on a CPU-only machine, the whole path in one command (about 4 minutes on 2 cores):
# synthetic captioning data -> webdataset shards -> tiny random Idefics2 (real Mistral tokenizer)
# converted to Megatron at TP2 x PP2 -> training on 4 gloo ranks, then a resume from its checkpoint
# -> export to Hugging Face -> greedy captions on held-out images, scored -> loss curve.
# Usage: bash examples/idefics2/run_tiny_cpu.sh [OUT]   (default runs/tiny_cpu; a rerun replaces OUT)
# Writes OUT/checkpoints (+ metrics.jsonl), OUT/hf, OUT/preds.jsonl, OUT/eval.json, OUT/loss.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/tiny_cpu}
CKPT=$OUT/checkpoints
TOOLS=toolkits/model_checkpoints_convertor/idefics2
ITERS=90 RESUME_ITERS=110  # one cosine schedule over both runs (a resume keeps --lr-decay-iters)
# Four ranks share the cores: one thread each. Hide megatron-core's expected notes on a CPU machine.
export OMP_NUM_THREADS=1
PYTHONWARNINGS="ignore:Transformer Engine and Apex are not installed,ignore:Apex is not installed"
export PYTHONWARNINGS+=",ignore:full scope is deprecated,ignore:When using async grad allreduce"
START=$SECONDS
step() { printf '\n=== [%3d s] %s ===\n' $((SECONDS - START)) "$*"; }

step "0/6 fresh output folder $OUT"
MARK=$OUT/.run_tiny_cpu  # only a folder this script made (or an empty one) is ever removed
if [[ -e "$OUT" && ! -e "$MARK" && -n "$(ls -A "$OUT")" ]]; then
  echo "run_tiny_cpu: error: $OUT exists and was not written by run_tiny_cpu.sh; pass another OUT" >&2
  exit 1
fi
rm -rf -- "$OUT"
mkdir -p "$OUT" && touch "$MARK"

step "1/6 synthetic coloured-shapes captions (LLaVA JSON + images)"
python examples/idefics2/make_shapes_dataset.py --output-dir "$OUT/data" --train 320 --valid 40

step "2/6 webdataset shards (train, valid)"
for split in train valid; do
  python toolkits/pretrain_data_preprocessing/build_webdataset.py --input "$OUT/data/$split.json" \
    --image-folder "$OUT/data/images" --output-dir "$OUT/shards/$split" --workers 1 --no-progress
done

step "3/6 tiny random Idefics2 -> Megatron checkpoint at TP2 x PP2 (release)"
python $TOOLS/make_tiny_checkpoint.py --save-path "$OUT/hf_init" --tokenizer mistral
python $TOOLS/hf2mcore.py --load-path "$OUT/hf_init" --save-path "$CKPT" \
  --target-tensor-model-parallel-size 2 --target-pipeline-model-parallel-size 2

train() {  # the same run each time; --load follows the tracker (release first, then the last save)
  torchrun --nproc-per-node 4 examples/idefics2/pretrain_megatron_idefics2.py \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --load "$CKPT" --save "$CKPT" \
    --data-path "$OUT/shards/train" --valid-data-path "$OUT/shards/valid" --answer-loss-only \
    --micro-batch-size 8 --global-batch-size 32 --seq-length 32 --num-workers 0 \
    --lr 5e-3 --min-lr 5e-4 --lr-warmup-iters 3 --lr-decay-style cosine \
    --lr-decay-iters "$RESUME_ITERS" --log-interval 1 --eval-interval 30 --save-interval 45 "$@"
}
step "4/6 train from release to iteration $ITERS (4 gloo ranks), then resume to $RESUME_ITERS"
train --train-iters "$ITERS"
step "4/6 resume from $CKPT (iteration $ITERS)"
train --train-iters "$RESUME_ITERS"
python examples/idefics2/tiny_cpu_report.py loss "$CKPT/metrics.jsonl" --min-drop 0.5

step "5/6 export to Hugging Face and caption the held-out images"
python $TOOLS/mcore2hf.py --load-path "$CKPT" --save-path "$OUT/hf"
python toolkits/eval/generate_and_score.py --hf-path "$OUT/hf" --data "$OUT/data/valid.json" \
  --image-folder "$OUT/data/images" --output "$OUT/preds.jsonl" --summary "$OUT/eval.json" \
  --max-new-tokens 12 --no-progress
python examples/idefics2/tiny_cpu_report.py preds "$OUT/preds.jsonl" --show 6

step "6/6 loss curve"
python toolkits/eval/plot_metrics.py "$CKPT/metrics.jsonl" --output "$OUT/loss.png"
step "done: $OUT (eval.json, loss.png, checkpoints/metrics.jsonl)"
