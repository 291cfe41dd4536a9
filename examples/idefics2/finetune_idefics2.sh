#!/usr/bin/env bash
# Idefics2-8B (Mistral-7B backbone), finetuning: everything trains, loss on the answers only.
# LOAD is a pretrain run's SAVE (or a converted release); --finetune (FINETUNE=1) takes its
# weights only and starts a new schedule at iteration 0. Once SAVE holds a checkpoint, a rerun
# resumes from SAVE instead (AUTO_RESUME=1). Each setting may be overridden from the environment
# (all of them: common.sh); extra arguments go to the entry point.
#   LOAD=/ckpts/idefics2-8b-pretrain DATA_PATH=/data/sft/train VALID_DATA_PATH=/data/sft/valid \
#     SAVE=/ckpts/idefics2-8b-sft bash examples/idefics2/finetune_idefics2.sh
# LoRA instead of full finetuning (adapters on the language model, the base frozen; LoRA takes a
# larger learning rate):  LORA_RANK=16 LORA_ALPHA=32 LR=2e-4 MIN_LR=2e-5 bash examples/idefics2/finetune_idefics2.sh
# DRY_RUN=1 prints the torchrun command without running it.
: "${TP:=2}" "${PP:=2}" "${MBS:=1}" "${GBS:=128}" "${SEQ_LEN:=2048}"
: "${TRAIN_ITERS:=2000}" "${LR:=1e-5}" "${MIN_LR:=1e-6}" "${WARMUP_ITERS:=50}"
: "${LOAD:=/ckpts/idefics2-8b-pretrain}" "${SAVE:=/ckpts/idefics2-8b-sft}"
: "${DATA_PATH:=/data/idefics2/sft/train}" "${VALID_DATA_PATH:=}"
: "${FREEZE=}" "${ANSWER_LOSS_ONLY:=1}" "${FINETUNE:=1}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
