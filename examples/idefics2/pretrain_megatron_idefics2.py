"""Pretrain or finetune Idefics2 on megatron-core (tensor, pipeline and data parallel).

One GPU:
    torchrun --nproc-per-node 1 examples/idefics2/pretrain_megatron_idefics2.py \
        --load /ckpts/idefics2-8b --data-path /data/shards --micro-batch-size 1 --global-batch-size 8 \
        --seq-length 2048 --train-iters 1000 --lr 1e-5 --bf16 --save /ckpts/run1 --save-interval 200
Many GPUs / nodes (the launchers in this folder set the rendezvous):
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --master-addr $MASTER_ADDR \
        --master-port 6000 examples/idefics2/pretrain_megatron_idefics2.py \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --use-distributed-optimizer ...
CPU (gloo), e.g. the tiny model of `run_tiny_cpu.sh`:
    torchrun --nproc-per-node 4 examples/idefics2/pretrain_megatron_idefics2.py \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --load runs/tiny_cpu/checkpoints ...
Evaluate only:
    torchrun ... pretrain_megatron_idefics2.py --skip-train --load CKPT --valid-data-path SHARDS ...
"""
from __future__ import annotations

import sys


def main(argv=None):
    from megatron_patch.training.arguments import PROG, parse_args

    args = parse_args(argv)  # every flag checked before anything is built
    from megatron_patch.training.build import build_training
    from megatron_patch.training.loop import pretrain
    from megatron_patch.platform.distributed import mark_error_exit
    from megatron_patch.errors import UserError
    from megatron_patch.training.errors import as_collective_timeout, report_error

    try:
        return pretrain(build_training(args))
    except Exception as err:  # bad checkpoint, data or resume flags; NaN stop; a timeout: one line, exit 1
        mark_error_exit()  # at exit, abort the process groups: peers may never come to a graceful destroy
        err = as_collective_timeout(err, args.distributed_timeout_minutes) or err
        if not isinstance(err, UserError):
            raise
        report_error(PROG, err)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
