#!/usr/bin/env bash
# Idefics2-8B (Mistral-7B backbone), pretraining: align the connector (modality projection +
# perceiver) with the LLM and the vision tower frozen. Each setting may be overridden from the
# environment (all of them: common.sh); extra arguments go to the entry point.
#   LOAD=/ckpts/idefics2-8b-mcore DATA_PATH=/data/pretrain/train SAVE=/ckpts/idefics2-8b-pretrain \
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/idefics2/pretrain_idefics2.sh
# DRY_RUN=1 prints the torchrun command without running it.
: "${TP:=2}" "${PP:=2}" "${MBS:=2}" "${GBS:=256}" "${SEQ_LEN:=2048}"
: "${TRAIN_ITERS:=5000}" "${LR:=1e-4}" "${MIN_LR:=1e-5}" "${WARMUP_ITERS:=100}"
: "${LOAD:=/ckpts/idefics2-8b-mcore}" "${SAVE:=/ckpts/idefics2-8b-pretrain}"
: "${DATA_PATH:=/data/idefics2/pretrain/train}" "${VALID_DATA_PATH:=}"
: "${FREEZE=--freeze-llm --freeze-clip-vision-tower}" "${ANSWER_LOSS_ONLY:=0}" "${FINETUNE:=0}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
