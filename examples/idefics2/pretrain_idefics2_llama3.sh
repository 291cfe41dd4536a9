#!/usr/bin/env bash
# Idefics2 with a Llama-3-8B backbone (built by idefics2_llama3/compose.py), pretraining: align the
# connector (modality projection + perceiver) with the LLM and the vision tower frozen. Each
# setting may be overridden from the environment (all of them: common.sh); extra arguments go to
# the entry point.
#   LOAD=/ckpts/idefics2-llama3-8b-mcore DATA_PATH=/data/pretrain/train SAVE=/ckpts/idefics2-llama3-8b-pretrain \
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/idefics2/pretrain_idefics2_llama3.sh
# DRY_RUN=1 prints the torchrun command without running it.
: "${TP:=2}" "${PP:=2}" "${MBS:=1}" "${GBS:=256}" "${SEQ_LEN:=4096}"
: "${TRAIN_ITERS:=5000}" "${LR:=5e-5}" "${MIN_LR:=5e-6}" "${WARMUP_ITERS:=100}"
: "${LOAD:=/ckpts/idefics2-llama3-8b-mcore}" "${SAVE:=/ckpts/idefics2-llama3-8b-pretrain}"
: "${DATA_PATH:=/data/idefics2-llama3/pretrain/train}" "${VALID_DATA_PATH:=}"
: "${FREEZE=--freeze-llm --freeze-clip-vision-tower}" "${ANSWER_LOSS_ONLY:=0}" "${FINETUNE:=0}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
