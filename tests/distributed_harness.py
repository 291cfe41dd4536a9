"""Run a function on N gloo ranks on CPU and collect what each rank returns.

    from tests.distributed_harness import run_distributed
    losses = run_distributed(4, train_tiny_gpt, steps=3)   # -> [rank0_value, ..., rank3_value]

`fn` must be a module-level function of an importable module (a test module is fine); it usually
starts with `init_distributed(tp, pp)`. Worker processes are kept alive per world size for the
whole pytest session: they are forked from a forkserver that has torch and megatron-core imported
(seconds saved per rank), join one gloo world once, and after every job drop megatron's
model-parallel state. A rank that raises, dies or outlives `timeout` gets the pool killed (it is
rebuilt on next use) and a `DistributedError` naming the rank and carrying its traceback.

`free_port()` is the one way a test picks a rendezvous port (this harness's pools, and the tests that
start torchrun or their own ranks: `--master-port` / `MASTER_PORT`).
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.reduction import ForkingPickler

# Heavy imports done once in the forkserver, inherited by every worker it forks.
_PRELOAD = ["torch", "megatron.core", "megatron_patch.platform", "megatron_patch.platform.cpu_compat"]
_START_TIMEOUT = 180.0  # seconds for a fresh pool to import and join its gloo world
_GRACE = 3.0  # after a rank fails, how long to wait for the others' reports before killing


class DistributedError(RuntimeError):
    """One or more ranks failed, died or timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent(lifeline) -> None:
    """Thread body: the test process holds the other end; EOF means it is gone, even mid-job."""
    try:
        lifeline.recv()
    except EOFError:
        pass
    os.killpg(0, signal.SIGKILL)


def _worker(rank: int, world_size: int, port: int, sys_path: list, conn, lifeline) -> None:
    """Worker main loop: join the gloo world, then run jobs until told to stop."""
    os.setpgrp()  # own process group: a kill also reaches helpers a job started (checkpoint writers)
    threading.Thread(target=_die_with_parent, args=(lifeline,), daemon=True).start()
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
    )
    sys.path[:] = sys_path  # test modules import the way they do in the pytest process
    import torch
    import torch.distributed as dist

    from megatron_patch.platform import destroy_distributed_state, init_distributed

    torch.set_num_threads(1)  # N ranks share 2 cores: no intra-op thread oversubscription
    try:
        init_distributed(1, 1)  # joins the world; each job re-lays model parallelism itself
        destroy_distributed_state()
        conn.send(("ready", os.getpid()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:  # the test process went away
            break
        if not payload:
            break
        try:
            fn, args, kwargs = ForkingPickler.loads(payload)
            reply = ("ok", fn(*args, **kwargs))
        except BaseException:
            reply = ("error", traceback.format_exc())
        if reply[0] == "ok":  # after a failure the pool is killed anyway: skip the collective teardown
            try:
                destroy_distributed_state()
            except BaseException:
                reply = ("error", "destroy_distributed_state() after the job failed:\n" + traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # the return value did not pickle
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    """`world_size` live worker processes joined in one gloo world."""

    def __init__(self, world_size: int):
        ctx = _context()
        self.world_size = world_size
        self.procs, self.conns, self.lifelines = [], [], []
        port = free_port()
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            life_read, life_write = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker, args=(rank, world_size, port, list(sys.path), child_end, life_read),
                name=f"dist-rank{rank}-of{world_size}",
            )
            proc.start()
            child_end.close()
            life_read.close()
            self.procs.append(proc)
            self.conns.append(parent_end)
            self.lifelines.append(life_write)  # never written: closing it (or dying) ends the worker
        replies = self._collect(_START_TIMEOUT, what="start-up")
        self.pids = [value for _, value in replies]

    def run(self, payload: bytes, what: str, timeout: float) -> list:
        for conn in self.conns:
            conn.send_bytes(payload)
        return [value for _, value in self._collect(timeout, what=what)]

    def _collect(self, timeout: float, what: str) -> list:
        """One reply per rank, or kill the pool and raise with every failure seen."""
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        failed_at = None
        while len(replies) < self.world_size:
            now = time.monotonic()
            limit = deadline if failed_at is None else min(deadline, failed_at + _GRACE)
            if now >= limit:
                break
            pending = {self.conns[r]: r for r in range(self.world_size) if r not in replies}
            for conn in multiprocessing.connection.wait(list(pending), timeout=limit - now):
                rank = pending[conn]
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    self.procs[rank].join(1)
                    code = self.procs[rank].exitcode
                    replies[rank] = ("error", f"process died (exit code {code}) without reporting")
                except Exception:
                    replies[rank] = ("error", "its reply could not be read here:\n" + traceback.format_exc())
                if replies[rank][0] == "error" and failed_at is None:
                    failed_at = time.monotonic()
        errors = {r: msg for r, (kind, msg) in replies.items() if kind == "error"}
        missing = [r for r in range(self.world_size) if r not in replies]
        if not errors and not missing:
            return [replies[r] for r in range(self.world_size)]
        self.kill()
        parts = [f"{what} on {self.world_size} ranks failed"]
        if missing and not errors:
            parts[0] += f": timed out after {timeout:.0f}s"
        parts += [f"--- rank {r} raised:\n{msg}" for r, msg in sorted(errors.items())]
        if missing:
            parts.append(f"--- ranks {missing} had not finished (killed; likely blocked in a collective)")
        raise DistributedError("\n".join(parts))

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def close(self, timeout: float = 10.0) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(b"")  # stop
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.join(5)
        for conn in self.conns + self.lifelines:
            conn.close()


_pools: dict[int, _Pool] = {}
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def run_distributed(world_size: int, fn, *args, timeout: float = 300, **kwargs) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the per-rank results."""
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be 1..8, got {world_size}")
    try:
        payload = bytes(ForkingPickler.dumps((fn, args, kwargs)))
    except Exception as error:
        raise TypeError(
            f"cannot send {fn!r} to the ranks ({error}); it must be a module-level function "
            "of an importable module, with picklable arguments"
        ) from error
    pool = _pools.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:  # a worker died between jobs: replace the whole pool
            _pools.pop(world_size).kill()
        pool = _pools[world_size] = _Pool(world_size)
    try:
        return pool.run(payload, f"{fn.__module__}.{fn.__qualname__}", timeout)
    except DistributedError:
        _pools.pop(world_size, None)
        raise


def pool_pids(world_size: int) -> list[int] | None:
    """PIDs of the live pool for `world_size` (None if none); for tests of the harness itself."""
    pool = _pools.get(world_size)
    return list(pool.pids) if pool is not None and pool.alive() else None


def shutdown_pools() -> None:
    """Stop every worker cleanly; called at the end of the pytest session."""
    while _pools:
        _, pool = _pools.popitem()
        pool.close()


atexit.register(shutdown_pools)
