"""Start, stop and clean up the Ray processes this project started, and nothing else.

* :func:`head_command` / :func:`worker_command`: the ``ray start`` lines of a cluster (dashboard off,
  see :data:`DASHBOARD_ARGS`); ``docs/cluster.md`` is the recipe.
* :func:`record_ray_session`: called by a driver after ``ray.init``; writes the Ray session folder
  and its node processes to ``<experiment>/ray_session.json``.
* :func:`clean_ray_session`: after a driver was killed (``kill -9``), ends the processes of that
  recorded session only: a process counts as ours when its command line names the recorded session
  (``session_<date>_<pid>``). Other users' and other experiments' Ray processes are never touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsss_tune.utils.io import atomic_write_json

__all__ = [
    "DASHBOARD_ARGS",
    "SESSION_FILE",
    "head_command",
    "worker_command",
    "record_ray_session",
    "session_processes",
    "clean_ray_session",
    "ray_stop",
]

#: ``ray start`` arguments that keep the dashboard off (Ray binds it to 127.0.0.1 by default when on;
#: off also saves a process per node).
DASHBOARD_ARGS = ("--include-dashboard=false",)
#: Record of the Ray session a sweep started, in the experiment folder.
SESSION_FILE = "ray_session.json"
#: Seconds :func:`clean_ray_session` waits after SIGTERM before sending SIGKILL.
TERM_GRACE_S = 5.0
#: Command-line fragments that identify a live sweep driver (the CLI or a script calling the sweep API).
DRIVER_MARKS = ("wsss-tune", "wsss_tune", "run_sweep", "resume_sweep")


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


def record_ray_session(exp_dir: str | Path) -> dict[str, Any]:
    """Write the current Ray session (folder, name, driver pid, whether this driver started it)."""
    import ray

    node = ray._private.worker._global_node  # noqa: SLF001 - the only place Ray exposes the session folder
    session_dir = node.get_session_dir_path() if node is not None else ""
    doc = {"session_dir": session_dir, "session_name": Path(session_dir).name if session_dir else "",
           "driver_pid": os.getpid(), "started_here": bool(node is not None and node.head),
           "recorded": time.time()}
    atomic_write_json(Path(exp_dir) / SESSION_FILE, doc)
    return doc


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def session_processes(session_name: str) -> list[int]:
    """Pids (other than this process) whose command line names ``session_name`` (Linux ``/proc``)."""
    if not session_name.startswith("session_"):
        raise ValueError(f"session name {session_name!r}: expected 'session_<date>_<pid>'")
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me and session_name in _cmdline(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and ") Z " in stat.read_text())


def clean_ray_session(exp_dir: str | Path, *, dry_run: bool = False) -> list[int]:
    """End the recorded session's processes if its driver is gone; returns their pids.

    Raises:
        FileNotFoundError: no :data:`SESSION_FILE` in ``exp_dir``.
        RuntimeError: the recording driver still runs (stop it first, e.g. Ctrl-C).
    """
    path = Path(exp_dir) / SESSION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no recorded Ray session (the sweep never started Ray here)")
    doc = json.loads(path.read_text())
    if not doc.get("started_here"):
        return []  # joined an existing cluster: its processes belong to whoever started it
    driver = int(doc["driver_pid"])
    # A live pid whose command line is a Python driver of this project is the driver itself (a reused
    # pid running something else is not).
    if _alive(driver) and any(mark in _cmdline(driver) for mark in DRIVER_MARKS):
        raise RuntimeError(f"the driver (pid {doc['driver_pid']}) of {exp_dir} still runs; stop it first")
    pids = session_processes(doc["session_name"])
    if dry_run:
        return pids
    for pid in pids:
        with _suppress():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with _suppress():
                os.kill(pid, signal.SIGKILL)
    return pids


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError | PermissionError)  # type: ignore[arg-type]


def ray_stop(env: Mapping[str, str] | None = None, *, extra: Sequence[str] = ()) -> None:
    """``ray stop --force`` for the nodes started with the same temp dir / environment (tests' clusters)."""
    subprocess.run([_ray_bin(), "stop", "--force", *extra], env=dict(env) if env is not None else None,
                   capture_output=True, timeout=120, check=False)
