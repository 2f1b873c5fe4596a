"""Whether a process still runs, judged by its pid *and* its start time.

A pid is reused once its process has ended, so a record of ``(pid, start time)`` names one process for
good: a later process with the same pid has another start time. One place for the artifact store's
build locks (:mod:`wsss_tune.artifacts`) and the Ray clean-up (``wsss_tune.trainables.cluster``).
Uses psutil, not torch.
"""

from __future__ import annotations

import functools
import os

import psutil

__all__ = ["START_TOLERANCE_S", "start_time", "running", "find_process", "alive"]

#: Two start times closer than this (seconds) are the same process (psutil reads them in clock ticks).
START_TOLERANCE_S = 0.5


@functools.lru_cache(maxsize=8)
def _start_time(pid: int) -> float:
    return psutil.Process(pid).create_time()


def start_time() -> float:
    """This process's start time (seconds since the epoch), as :func:`alive` and :func:`find_process` compare it."""
    return _start_time(os.getpid())  # keyed by pid: a forked child has its own


def running(proc: psutil.Process) -> bool:
    """Whether ``proc`` (the very process, not a later one with its pid) still runs; a zombie has ended.

    A process this user may not inspect counts as running.
    """
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _same_start(proc: psutil.Process, started: float) -> bool:
    return abs(proc.create_time() - float(started)) <= START_TOLERANCE_S


def find_process(pid: int, started: float | None = None) -> psutil.Process | None:
    """The running process ``pid`` (the one started at ``started``, when given) as a handle to inspect or
    signal, else None: also when this user may not inspect it."""
    try:
        if int(pid) <= 0:
            return None
        proc = psutil.Process(int(pid))
        if started is not None and not _same_start(proc, started):
            return None  # the pid now belongs to another process
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
        return None
    return proc if running(proc) else None


def alive(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` runs on this host; with ``started``, only the one started then (a reused
    pid belongs to a process that is not alive in this sense). A zombie has ended.

    A process that exists but that this user may not inspect (another user's, or hidden by ``/proc``'s
    ``hidepid``) counts as alive: it cannot be told apart from the recorded one, and taking a live
    holder for dead is the worse mistake.
    """
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if started is not None and not _same_start(proc, started):
            return False
        return running(proc)
    except psutil.ZombieProcess:
        return False
    except psutil.NoSuchProcess:
        return _hidden(pid)
    except psutil.AccessDenied:
        return True


def _hidden(pid: int) -> bool:
    """A pid that psutil cannot see but the kernel knows (``kill(pid, 0)`` is refused, not failed)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return False
