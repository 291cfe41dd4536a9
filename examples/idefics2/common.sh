# Shared by the Idefics2 launchers (pretrain_*.sh, finetune_*.sh): source it after setting defaults.
# Every variable below may come from the environment; the launcher's own defaults come first.
#   rendezvous   NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6000), GPUS_PER_NODE (8)
#   layout       TP, PP, SP (1: --sequence-parallel when TP > 1)
#   batch        MBS, GBS, SEQ_LEN
#   schedule     TRAIN_ITERS, LR, MIN_LR, WARMUP_ITERS, LR_DECAY_STYLE (cosine), LR_DECAY_ITERS
#                (default TRAIN_ITERS; a resume must keep it: to extend a run, raise TRAIN_ITERS
#                and set LR_DECAY_ITERS to the old value)
#   checkpoints  LOAD (must exist), SAVE, SAVE_INTERVAL (500), FINETUNE (1: --finetune), AUTO_RESUME (1)
#   data         DATA_PATH ("dir" or a blend "0.7 dirA 0.3 dirB"; a dataset may also be a URL such
#                as s3://bucket/ds or file:///abs/ds, see docs/data.md), VALID_DATA_PATH (empty: no
#                validation), EVAL_INTERVAL (500), EVAL_ITERS (empty: the whole set), NUM_WORKERS (4)
#   training     FREEZE (freeze flags), ANSWER_LOSS_ONLY (1: --answer-loss-only),
#                DIST_FLAGS (--bf16 --use-distributed-optimizer --accumulate-allreduce-grads-in-fp32)
#   overlap      OVERLAP (1: --overlap-grad-reduce, and --overlap-param-gather when DIST_FLAGS has
#                --use-distributed-optimizer); CUDA_DEVICE_MAX_CONNECTIONS (1, exported: sequence
#                parallel's communication must be queued before the compute that follows it)
#   logging      LOG_INTERVAL (10), TENSORBOARD_DIR (empty: none; needs `pip install tensorboard`);
#                metrics always go to SAVE/metrics.jsonl
#   stopping     EXIT_SIGNAL (empty; e.g. SIGUSR1: --exit-signal-handler, the workers save and exit 0 on
#                it, torchrun ignores it so it cannot SIGKILL them mid-save: docs/training.md),
#                SAVE_TOTAL_LIMIT (empty: keep every checkpoint), ASYNC_SAVE (0; 1: --async-save, saves
#                written in the background from a host copy of the state)
#   LoRA         LORA_RANK (empty: full training; R: --lora-rank R, the whole base frozen), LORA_ALPHA
#                (empty: R), LORA_DROPOUT, LORA_TARGETS (--lora-target-modules; empty: the language
#                model's seven projections), LORA_MODULES_TO_SAVE (e.g. connector: trained fully),
#                LORA_LOAD (a peft adapter folder to start from). A resume of SAVE takes the
#                adapters' settings from its checkpoint and drops LORA_LOAD.
#   DRY_RUN=1    print the command and exit 0 without running it
# Arguments given to the launcher are appended to the entry point's flags (the last one wins).
# Gradient-accumulation fusion needs no setting: the entry point turns it on where apex's
# fused_weight_gradient_mlp_cuda is importable and reports it off otherwise.
# With AUTO_RESUME=1, a SAVE that already holds a checkpoint is resumed (LOAD=SAVE, no --finetune),
# so a requeued job continues where it stopped.
set -euo pipefail

NAME=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ENTRY="$REPO/examples/idefics2/pretrain_megatron_idefics2.py"

: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}" "${GPUS_PER_NODE:=8}"
: "${SP:=1}" "${LR_DECAY_STYLE:=cosine}" "${LR_DECAY_ITERS:=$TRAIN_ITERS}"
: "${SAVE_INTERVAL:=500}" "${EVAL_INTERVAL:=500}" "${EVAL_ITERS:=}"
: "${NUM_WORKERS:=4}" "${LOG_INTERVAL:=10}" "${TENSORBOARD_DIR:=}" "${VALID_DATA_PATH:=}"
: "${FINETUNE:=0}" "${ANSWER_LOSS_ONLY:=0}" "${FREEZE=}" "${AUTO_RESUME:=1}" "${DRY_RUN:=0}"
: "${OVERLAP:=1}" "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
export CUDA_DEVICE_MAX_CONNECTIONS
: "${EXIT_SIGNAL:=}" "${SAVE_TOTAL_LIMIT:=}" "${ASYNC_SAVE:=0}"
: "${LORA_RANK:=}" "${LORA_ALPHA:=}" "${LORA_DROPOUT:=}" "${LORA_TARGETS:=}" "${LORA_MODULES_TO_SAVE:=}" "${LORA_LOAD:=}"
: "${DIST_FLAGS=--bf16 --use-distributed-optimizer --accumulate-allreduce-grads-in-fp32}"

die() { echo "$NAME: error: $*" >&2; exit 1; }
has_checkpoint() { [[ -f "$1/latest_checkpointed_iteration.txt" || -d "$1/release" ]]; }

for var in NNODES GPUS_PER_NODE TP PP MBS GBS SEQ_LEN TRAIN_ITERS LR_DECAY_ITERS SAVE_INTERVAL EVAL_INTERVAL LOG_INTERVAL; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var=${!var} must be a positive integer"
done
[[ "$NODE_RANK" =~ ^[0-9]+$ && NODE_RANK -lt NNODES ]] || die "NODE_RANK=$NODE_RANK must be in [0, NNODES=$NNODES)"
[[ -n "$SAVE" ]] || die "SAVE is empty: set it to the folder that receives checkpoints and metrics.jsonl"
if [[ "$AUTO_RESUME" == 1 ]] && has_checkpoint "$SAVE"; then
  echo "$NAME: SAVE=$SAVE already holds a checkpoint: resuming from it (AUTO_RESUME=0 to start from LOAD)"
  LOAD=$SAVE FINETUNE=0 LORA_LOAD=  # a LoRA checkpoint holds its adapters (and names its base)
fi
[[ -d "$LOAD" ]] || die "LOAD=$LOAD does not exist: convert a checkpoint there with hf2mcore.py"
has_checkpoint "$LOAD" || die "LOAD=$LOAD holds no checkpoint (no latest_checkpointed_iteration.txt or release/)"
for var in DATA_PATH VALID_DATA_PATH; do
  for word in ${!var}; do  # a blend alternates weights and shard folders (URLs: the entry point checks them)
    [[ "$word" == pipe:* ]] && die "$var: pipe: commands hold spaces, which the launcher splits; pass --data-path to the entry point directly (docs/data.md)"
    [[ "$word" =~ ^[0-9.]+$ || "$word" == *://* || -d "$word" ]] || die "$var: shard folder $word does not exist (build_webdataset.py writes one)"
  done
done
[[ -n "$DATA_PATH" ]] || die "DATA_PATH is empty: set it to a shard folder written by build_webdataset.py"

WORLD=$((NNODES * GPUS_PER_NODE))
((WORLD % (TP * PP) == 0)) || die "TP*PP=$((TP * PP)) does not divide NNODES*GPUS_PER_NODE=$WORLD GPUs; change TP, PP or the node count"
DP=$((WORLD / (TP * PP)))
((GBS % (MBS * DP) == 0)) || die "GBS=$GBS is not divisible by MBS*DP=$MBS*$DP=$((MBS * DP)); choose a multiple of $((MBS * DP))"

# shellcheck disable=SC2206  # DATA_PATH, FREEZE and DIST_FLAGS are word lists on purpose
ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --seq-length "$SEQ_LEN"
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS"
  --lr-decay-style "$LR_DECAY_STYLE" --lr-decay-iters "$LR_DECAY_ITERS"
  --load "$LOAD" --save "$SAVE" --save-interval "$SAVE_INTERVAL"
  --data-path $DATA_PATH --num-workers "$NUM_WORKERS"
  --log-interval "$LOG_INTERVAL"
  $DIST_FLAGS $FREEZE
)
((TP > 1)) && [[ "$SP" == 1 ]] && ARGS+=(--sequence-parallel)
if [[ "$OVERLAP" == 1 ]]; then
  ARGS+=(--overlap-grad-reduce)
  [[ " $DIST_FLAGS " == *" --use-distributed-optimizer "* ]] && ARGS+=(--overlap-param-gather)
fi
[[ "$FINETUNE" == 1 ]] && ARGS+=(--finetune)
[[ "$ANSWER_LOSS_ONLY" == 1 ]] && ARGS+=(--answer-loss-only)
[[ -n "$TENSORBOARD_DIR" ]] && ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
if [[ -n "$VALID_DATA_PATH" ]]; then
  # shellcheck disable=SC2206
  ARGS+=(--valid-data-path $VALID_DATA_PATH --eval-interval "$EVAL_INTERVAL")
  [[ -n "$EVAL_ITERS" ]] && ARGS+=(--eval-iters "$EVAL_ITERS")
fi

[[ -n "$SAVE_TOTAL_LIMIT" ]] && ARGS+=(--save-total-limit "$SAVE_TOTAL_LIMIT")
[[ "$ASYNC_SAVE" == 1 ]] && ARGS+=(--async-save)
[[ -n "$LORA_RANK" ]] && ARGS+=(--lora-rank "$LORA_RANK")
[[ -n "$LORA_ALPHA" ]] && ARGS+=(--lora-alpha "$LORA_ALPHA")
[[ -n "$LORA_DROPOUT" ]] && ARGS+=(--lora-dropout "$LORA_DROPOUT")
[[ -n "$LORA_TARGETS" ]] && ARGS+=(--lora-target-modules "$LORA_TARGETS")
[[ -n "$LORA_MODULES_TO_SAVE" ]] && ARGS+=(--lora-modules-to-save "$LORA_MODULES_TO_SAVE")
if [[ -n "$LORA_LOAD" ]]; then
  [[ -f "$LORA_LOAD/adapter_config.json" ]] || die "LORA_LOAD=$LORA_LOAD holds no adapter_config.json (a peft adapter folder)"
  ARGS+=(--lora-load "$LORA_LOAD")
fi
TORCHRUN_SIGNALS=()
if [[ -n "$EXIT_SIGNAL" ]]; then
  [[ "$EXIT_SIGNAL" =~ ^SIG(TERM|INT|USR1|USR2|HUP)$ ]] || die "EXIT_SIGNAL=$EXIT_SIGNAL must be one of SIGTERM SIGINT SIGUSR1 SIGUSR2 SIGHUP"
  ARGS+=(--exit-signal-handler --exit-signal "$EXIT_SIGNAL")
  # torchrun would forward it, SIGKILL the workers --shutdown-timeout (30 s) later and exit non-zero;
  # instead it ignores it (SIG_IGN survives exec) and the signal reaches the workers from SLURM.
  TORCHRUN_SIGNALS=(--signals-to-handle "$(tr , '\n' <<< SIGTERM,SIGINT,SIGHUP,SIGQUIT | grep -vx "$EXIT_SIGNAL" | paste -sd,)")
  trap '' "${EXIT_SIGNAL#SIG}"
fi
CMD=(torchrun "${TORCHRUN_SIGNALS[@]}" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$ENTRY" "${ARGS[@]}" "$@")
echo "$NAME: node $NODE_RANK of $NNODES, $WORLD GPUs = TP $TP x PP $PP x DP $DP; CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS; command:"
printf '%q ' "${CMD[@]}"
echo
[[ "$DRY_RUN" == 1 ]] && exit 0
exec "${CMD[@]}"
