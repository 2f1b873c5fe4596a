"""Start, stop and clean up the Ray processes this project started, and nothing else.

* :func:`head_command` / :func:`worker_command`: the ``ray start`` lines of a cluster (dashboard off,
  see :data:`DASHBOARD_ARGS`); ``docs/cluster.md`` is the recipe.
* :func:`record_ray_session`: called by a driver after ``ray.init``; writes the Ray session folder,
  the driver and the session's processes at that moment to ``<experiment>/ray_session.json``.
* :func:`clean_ray_session`: after a driver was killed (``kill -9``), ends the processes of that
  recorded session only (:func:`find_session_processes` says which): SIGTERM, then SIGKILL for those
  still running after a grace period (Ray's dashboard and runtime-env agents ignore SIGTERM), and
  says what it ended, process by process. Other users' and other experiments' Ray processes are
  never touched.

A process counts as one of the session's when

* its command line names the session (``session_<date>_<pid>``: the raylet, the GCS server, the
  dashboard, the monitor and the log monitor carry it in their arguments), or
* it holds a file open inside the session folder (the dashboard agent, the runtime-env agent and the
  workers rename themselves ``ray::<Name>``, dropping their arguments, but keep their log files under
  ``<session>/logs`` open), or
* it was recorded with the session (same pid and start time: a reused pid is not the same process),
* or it descends from one of those (a worker the raylet just started).

Processes are read with psutil; :mod:`wsss_tune.utils.procs` decides whether a process still runs (pid
and start time, so a reused pid is another process; a zombie has ended), for the recorded driver and
for the processes being ended alike, as it does for the artifact store's build locks.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from wsss_tune.utils.io import atomic_write_json
from wsss_tune.utils.procs import find_process, running, start_time

__all__ = [
    "DASHBOARD_ARGS",
    "SESSION_FILE",
    "TERM_GRACE_S",
    "DriverStillRunsError",
    "SessionProcess",
    "CleanReport",
    "head_command",
    "worker_command",
    "record_ray_session",
    "find_session_processes",
    "session_processes",
    "end_processes",
    "clean_ray_session",
]

#: ``ray start`` arguments that keep the dashboard off (Ray binds it to 127.0.0.1 by default when on;
#: off also saves a process per node).
DASHBOARD_ARGS = ("--include-dashboard=false",)
#: Record of the Ray session a sweep started, in the experiment folder.
SESSION_FILE = "ray_session.json"
#: Seconds :func:`clean_ray_session` waits after SIGTERM before sending SIGKILL.
TERM_GRACE_S = 5.0
#: Seconds to wait after SIGKILL for the kernel to end a process (it cannot be ignored; an
#: uninterruptible sleep, e.g. on a hung network filesystem, can delay it).
KILL_WAIT_S = 5.0
#: Command-line fragments that identify a live sweep driver (the CLI or a script calling the sweep API);
#: used for records without the driver's start time (written before it was recorded).
DRIVER_MARKS = ("wsss-tune", "wsss_tune", "run_sweep", "resume_sweep")
#: How often the wait loops look again (seconds).
_POLL_S = 0.05


class DriverStillRunsError(RuntimeError):
    """The driver that recorded the session still runs: its processes are in use, not left behind."""


@dataclass(frozen=True)
class SessionProcess:
    """One process of a Ray session, and (after :func:`end_processes`) how it ended.

    ``signal`` is the signal that ended it (``SIGTERM``, ``SIGKILL``), ``gone`` when it had ended
    before a signal reached it, ``survived`` when it still ran after SIGKILL, ``denied`` when this
    user may not signal it, and empty when it was only found (a dry run).
    """

    pid: int
    name: str
    started: float
    signal: str = ""

    def line(self) -> str:
        how = {"": "", "SIGTERM": " (SIGTERM)", "SIGKILL": " (SIGKILL: it ignored SIGTERM)",
               "gone": " (had already exited)", "survived": " (still running after SIGKILL)",
               "denied": " (not permitted to signal it)"}[self.signal]
        return f"pid {self.pid} {self.name}{how}"

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "name": self.name, "started": self.started}


@dataclass(frozen=True)
class CleanReport:
    """What :func:`clean_ray_session` found and did."""

    session_name: str
    processes: tuple[SessionProcess, ...]
    dry_run: bool
    #: Why nothing was looked for (a joined cluster), else empty.
    skipped: str = ""

    @property
    def ended(self) -> tuple[SessionProcess, ...]:
        """Processes this clean-up ended (by SIGTERM or SIGKILL)."""
        return tuple(p for p in self.processes if p.signal in ("SIGTERM", "SIGKILL"))

    @property
    def left(self) -> tuple[SessionProcess, ...]:
        """Processes still running afterwards (not permitted, or not ended by SIGKILL in time)."""
        return tuple(p for p in self.processes if p.signal in ("survived", "denied"))


def _ray_bin() -> str:
    from shutil import which

    return which("ray") or "ray"


def head_command(*, port: int, num_cpus: int, num_gpus: int = 0, temp_dir: str | None = None,
                 resources: Mapping[str, float] | None = None, node_ip: str = "127.0.0.1") -> list[str]:
    """``ray start --head`` on ``port`` with the dashboard off."""
    cmd = [_ray_bin(), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
           f"--node-ip-address={node_ip}", *DASHBOARD_ARGS, "--disable-usage-stats"]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    if resources:
        cmd.append(f"--resources={json.dumps(dict(resources))}")
    return cmd


def worker_command(*, address: str, num_cpus: int, num_gpus: int = 0, temp_dir: str | None = None,
                   resources: Mapping[str, float] | None = None, node_ip: str = "127.0.0.1") -> list[str]:
    """``ray start --address`` joining a head (``temp_dir`` is per node)."""
    cmd = [_ray_bin(), "start", f"--address={address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
           f"--node-ip-address={node_ip}", "--disable-usage-stats"]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    if resources:
        cmd.append(f"--resources={json.dumps(dict(resources))}")
    return cmd


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def _name(proc: psutil.Process) -> str:
    """A readable name: ``ray::DashboardAgent``, ``raylet``, ``gcs_server``, ``python (log_monitor.py)``."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].strip()
    script = next((os.path.basename(a) for a in cmd[1:4] if a.endswith(".py")), None)
    return f"{name} ({script})" if script else name


def _record(proc: psutil.Process) -> SessionProcess:
    try:
        started = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        started = 0.0
    return SessionProcess(pid=proc.pid, name=_name(proc), started=started)


def _names_session(proc: psutil.Process, session_name: str) -> bool:
    """The command line names the session, or a file it holds open lies in the session folder."""
    marker = f"{os.sep}{session_name}{os.sep}"
    try:
        if any(session_name in arg for arg in proc.cmdline()):
            return True
        return any(marker in f.path for f in proc.open_files())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def find_session_processes(session_name: str, recorded: Iterable[Mapping[str, Any]] = ()) -> list[SessionProcess]:
    """The running processes of the Ray session ``session_name`` (see the module docstring), other than
    this process and its ancestors, sorted by pid.

    Args:
        session_name: ``session_<date>_<pid>`` (the session folder's name).
        recorded: Processes recorded with the session (``{"pid", "started"}``): counted when the same
            process still runs.

    Raises:
        ValueError: ``session_name`` does not look like a Ray session name (it would match too much).
    """
    if not isinstance(session_name, str) or not session_name.startswith("session_") or len(session_name) < 12:
        raise ValueError(f"session name {session_name!r}: expected 'session_<date>_<pid>'")
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for entry in recorded:
        proc = find_process(int(entry.get("pid", 0)), entry.get("started"))
        if proc is not None:
            found[proc.pid] = proc
    for proc in psutil.process_iter():
        if proc.pid not in spared and proc.pid not in found and running(proc) and _names_session(proc, session_name):
            found[proc.pid] = proc
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                if child.pid not in spared and running(child):
                    found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for pid in spared:
        found.pop(pid, None)
    return [_record(found[pid]) for pid in sorted(found)]


def session_processes(session_name: str) -> list[int]:
    """Pids of :func:`find_session_processes` (other than this process)."""
    return [p.pid for p in find_session_processes(session_name)]


def end_processes(procs: Sequence[SessionProcess], *, grace: float = TERM_GRACE_S) -> list[SessionProcess]:
    """SIGTERM each process, SIGKILL those still running after ``grace`` seconds; returns each with
    the signal that ended it (see :class:`SessionProcess`)."""
    handles: dict[int, psutil.Process] = {}
    how: dict[int, str] = {}
    for p in procs:
        proc = find_process(p.pid, p.started or None)
        if proc is None:
            how[p.pid] = "gone"
            continue
        try:
            proc.send_signal(signal.SIGTERM)
            handles[p.pid] = proc
            how[p.pid] = "SIGTERM"
        except psutil.NoSuchProcess:
            how[p.pid] = "gone"
        except psutil.AccessDenied:
            how[p.pid] = "denied"
    _wait(handles.values(), grace)
    for pid, proc in handles.items():
        if running(proc):
            try:
                proc.send_signal(signal.SIGKILL)
                how[pid] = "SIGKILL"
            except psutil.NoSuchProcess:
                pass
            except psutil.AccessDenied:
                how[pid] = "denied"
    _wait([handles[pid] for pid, h in how.items() if h == "SIGKILL"], KILL_WAIT_S)
    for pid, proc in handles.items():
        if how[pid] == "SIGKILL" and running(proc):
            how[pid] = "survived"
    return [SessionProcess(pid=p.pid, name=p.name, started=p.started, signal=how[p.pid]) for p in procs]


def _wait(procs: Iterable[psutil.Process], seconds: float) -> None:
    pending = list(procs)
    deadline = time.monotonic() + max(0.0, seconds)
    while pending:
        pending = [p for p in pending if running(p)]
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(_POLL_S)


# --------------------------------------------------------------------------------------------------
# Recorded sessions
# --------------------------------------------------------------------------------------------------


def record_ray_session(exp_dir: str | Path) -> dict[str, Any]:
    """Write the current Ray session (folder, name, driver pid and start time, whether this driver
    started it, and the session's processes now) to ``<exp_dir>/ray_session.json``."""
    import ray

    node = ray._private.worker._global_node  # noqa: SLF001 - the only place Ray exposes the session folder
    session_dir = node.get_session_dir_path() if node is not None else ""
    session_name = Path(session_dir).name if session_dir else ""
    started_here = bool(node is not None and node.head)
    procs = find_session_processes(session_name) if started_here and session_name else []
    doc = {"session_dir": session_dir, "session_name": session_name,
           "driver_pid": os.getpid(), "driver_started": start_time(),
           "started_here": started_here, "processes": [p.to_dict() for p in procs],
           "recorded": time.time()}
    atomic_write_json(Path(exp_dir) / SESSION_FILE, doc)
    return doc


def _read_record(path: Path) -> dict[str, Any]:
    """``ray_session.json``, checked: a clear error naming the file and the field otherwise."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{path}: no recorded Ray session ({what}; the sweep never started Ray here)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable Ray session record ({exc}); nothing was ended. If the sweep's "
                         "Ray processes still run, list them with `ps -ef | grep ray::` and end them by pid, "
                         "or `ray stop --force` when no other Ray session on this machine must survive") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    for key, kind in (("session_name", str), ("driver_pid", int)):
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise ValueError(f"{path}: field {key!r} is {doc.get(key)!r}, expected {kind.__name__} "
                             "(the file is damaged; nothing was ended)")
    if not isinstance(doc.get("processes", []), list):
        raise ValueError(f"{path}: field 'processes' is {doc.get('processes')!r}, expected a list")
    return doc


def _driver_runs(doc: Mapping[str, Any]) -> bool:
    """Whether the recording driver still runs (a reused pid running something else does not count)."""
    started = doc.get("driver_started")
    proc = find_process(doc["driver_pid"], started if isinstance(started, int | float) else None)
    if proc is None:
        return False
    if started is not None:
        return True
    try:  # a record without the start time: a live pid running a driver of this project
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(mark in cmdline for mark in DRIVER_MARKS)


def clean_ray_session(exp_dir: str | Path, *, dry_run: bool = False, grace: float = TERM_GRACE_S) -> CleanReport:
    """End the recorded session's processes if its driver is gone (see the module docstring).

    Args:
        exp_dir: The experiment folder holding :data:`SESSION_FILE`.
        dry_run: Only find the processes.
        grace: Seconds between SIGTERM and SIGKILL.

    Raises:
        FileNotFoundError: no :data:`SESSION_FILE` in ``exp_dir``.
        ValueError: the record is unreadable or names no valid session.
        DriverStillRunsError: the recording driver still runs (stop it first, e.g. Ctrl-C).
    """
    if grace < 0:
        raise ValueError(f"grace={grace!r}: expected seconds >= 0")
    path = Path(exp_dir) / SESSION_FILE
    doc = _read_record(path)
    name = doc["session_name"]
    if not doc.get("started_here"):
        return CleanReport(session_name=name, processes=(), dry_run=dry_run,
                           skipped="the sweep joined a running Ray cluster; its processes belong to whoever "
                                   "started it (`ray stop` on its nodes)")
    if _driver_runs(doc):
        raise DriverStillRunsError(f"the driver (pid {doc['driver_pid']}) of {exp_dir} still runs; stop it first "
                           "(Ctrl-C, or `kill` it), then run ray-clean again")
    recorded = [p for p in doc.get("processes", []) if isinstance(p, dict)]
    procs = find_session_processes(name, recorded)
    if not dry_run:
        procs = end_processes(procs, grace=grace)
    return CleanReport(session_name=name, processes=tuple(procs), dry_run=dry_run)

