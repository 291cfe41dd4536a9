"""Kill a launched run completely: torchrun and every process under it.

torchrun starts each worker in a session of its own, so signalling torchrun's process group reaches
torchrun only and the workers finish the run as orphans. The tree is frozen first (SIGSTOP, repeated
until no new process appears) so that nothing can start a child or write a file while it is killed.
"""
from __future__ import annotations

import signal
import time

import psutil


def _signal(proc: psutil.Process, sig) -> None:
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _children(procs) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            out += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return out


def _stop_tree(root: psutil.Process) -> dict[int, psutil.Process]:
    """Stop `root`, then its descendants, until a look finds no process not stopped yet."""
    seen = {root.pid: root}
    _signal(root, signal.SIGSTOP)
    while True:
        new = {p.pid: p for p in _children(seen.values()) if p.pid not in seen}
        if not new:
            return seen
        for proc in new.values():
            _signal(proc, signal.SIGSTOP)
        seen.update(new)


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_tree(pid: int, timeout: float = 60.0) -> list[int]:
    """SIGKILL `pid` and all its descendants; returns their pids once every one is gone."""
    procs = _stop_tree(psutil.Process(pid))
    for proc in procs.values():
        _signal(proc, signal.SIGKILL)
    deadline = time.time() + timeout
    while not all(_gone(p) for p in procs.values()):
        if time.time() > deadline:
            alive = [p.pid for p in procs.values() if not _gone(p)]
            raise AssertionError(f"processes {alive} survived SIGKILL for {timeout} s")
        time.sleep(0.05)
    return sorted(procs)
