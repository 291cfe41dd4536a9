"""Device and backend choice, torch.distributed start-up and megatron-core model-parallel state.

CUDA present: NCCL on `cuda:LOCAL_RANK`, nothing redirected. CUDA absent: gloo on CPU with the
compatibility layer of `cpu_compat` applied once. The process group lives for the whole process
and is shut down at exit (aborted, not waited for, on an error exit); the model-parallel layout on
top of it can be torn down and rebuilt (`init_distributed` again).

megatron-core's gloo copies of the data-parallel groups are not created (`gloo_groups=False`): only
its dp-zero optimizer checkpoint format uses them, and our checkpoints write per-rank parts without
a collective; the optimizer is built with `use_gloo_process_groups=False` to match.
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .accelerators import describe
from .seeding import set_seed

_platform_ready = False
_error_exit = False
DEFAULT_TIMEOUT_MINUTES = 10  # Megatron-LM's --distributed-timeout-minutes default


def get_device() -> torch.device:
    """The device this process computes on (`cuda:<current>` or `cpu`)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup_platform() -> torch.device:
    """Prepare this process once (CPU redirects when CUDA is absent), report it, return the device."""
    global _platform_ready
    if not _platform_ready:
        if not torch.cuda.is_available():
            from . import cpu_compat

            cpu_compat.apply()
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if rank == 0:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            print(f"[megatron_patch] device={device} backend={backend()} accelerators: {describe()}", flush=True)
        _platform_ready = True
    return get_device()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(timeout_minutes: int) -> None:
    """torch.distributed from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT")
    if port is None:
        if world_size != 1:
            raise ValueError(f"WORLD_SIZE={world_size} but MASTER_PORT is unset; launch with torchrun or set it")
        port = str(_free_port())
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend(),
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    atexit.register(_shut_down_at_exit)


def mark_error_exit() -> None:
    """This process is leaving with an error: at exit, abort the process groups instead of
    destroying them (an uncaught exception is noticed without this call)."""
    global _error_exit
    _error_exit = True


def _leaving_with_error() -> bool:
    # sys.last_value: set by the interpreter after it printed an uncaught exception, before atexit.
    return _error_exit or getattr(sys, "last_value", None) is not None


def _shut_down_at_exit() -> None:
    """Close every group and the store while the interpreter is alive, on every way out (success,
    one-line error, exception). Left to the interpreter's finalisation, gloo's worker threads and
    the TCP store's server thread are torn down after Python is gone and the process can abort
    (SIGABRT, "terminate called without an active exception") after it already reported its result.
    Local, no barrier: the other ranks may be anywhere when one rank leaves with an error. On an
    error exit the groups are aborted: NCCL's graceful destroy waits for outstanding collectives,
    which peers that failed or hang will never complete.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # drop megatron's references to the groups
    if not dist.is_initialized():
        return
    if _leaving_with_error():
        dist.distributed_c10d._abort_process_group()  # every group, without waiting for peers
    else:
        dist.destroy_process_group()  # all groups, the default one last


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    seed: int = 1234,
    num_layers_in_first_pipeline_stage: int | None = None,  # lives in the model config; accepted for callers
    timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES,
    gloo_groups: bool = False,
) -> None:
    """Start torch.distributed if needed, (re)build megatron's TP x PP x DP layout, seed everything.

    `timeout_minutes` (--distributed-timeout-minutes) bounds every collective and the rendezvous;
    it applies to the world group when this call creates it. `gloo_groups`: megatron-core's gloo
    copies of its data-parallel groups (only its dp-zero optimizer checkpoints need them)."""
    from megatron.core import parallel_state

    setup_platform()
    if not dist.is_initialized():
        _init_process_group(timeout_minutes)
    tp, pp, world = tensor_model_parallel_size, pipeline_model_parallel_size, dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} = {tp * pp}; choose sizes whose product divides the rank count"
        )
    destroy_distributed_state()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=gloo_groups,
    )
    set_seed(seed)


def destroy_distributed_state() -> None:
    """Tear down megatron-core's model-parallel groups; the torch.distributed world stays up.

    Collective: call it on every rank. megatron's own `destroy_model_parallel` only forgets most
    groups; each rebuilt layout would then leak ~20 gloo groups (sockets, threads, and slower
    group creation), so the groups megatron created are destroyed here as well.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return
    groups = [g for g in getattr(parallel_state, "_global_process_group_list", None) or [] if g is not None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # no peer may still be finishing an operation on a group we close
    parallel_state.destroy_model_parallel()
    for group in groups:
        try:
            dist.destroy_process_group(group)
        except ValueError:  # already destroyed by destroy_model_parallel (its gloo twins)
            pass
