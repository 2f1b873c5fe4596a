"""``wsss-tune ray-clean``: ends every process of the Ray session a killed sweep recorded, and only those.

Most tests here start no Ray: stand-in processes carry the marks Ray's processes carry. The raylet,
the GCS server and the monitors name the session on their command line (``--session-name=session_...``);
the dashboard and runtime-env agents and the workers rename themselves ``ray::<Name>`` (no session on
the command line) but keep their log files under ``<session>/logs`` open, and the agents ignore
SIGTERM. One slow test kills a real driver and cleans its real session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from wsss_tune.cli import app
from wsss_tune.trainables.cluster import (
    SESSION_FILE,
    DriverStillRunsError,
    clean_ray_session,
    find_session_processes,
    head_command,
    session_processes,
)
from wsss_tune.utils.io import atomic_write_json

OURS = "session_2099-01-01_00-00-00_424242"
OTHER = "session_2099-01-01_00-00-00_777777"
#: Grace between SIGTERM and SIGKILL in these tests (seconds; the default is 5).
GRACE = 0.5

#: A stand-in agent: renames itself (argv[0] ``ray::<Name>``, like Ray's setproctitle), ignores
#: SIGTERM, keeps a log file of the session open (path from the environment, so that its command
#: line does not name the session), then says it is ready.
AGENT_CODE = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log = open(os.environ["STANDIN_LOG"], "a")
    print("ready", flush=True)
    time.sleep(60)
""")
#: A stand-in raylet: names the session on its command line and starts a worker whose command line
#: names nothing (it is found as the raylet's child); prints the worker's pid.
RAYLET_CODE = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(worker.pid, flush=True)
    time.sleep(60)
""")


class Processes:
    """Processes a test started; every one still running is killed at the end (by pid)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []

    def start(self, args: list[str], env: dict[str, str] | None = None, *, ready: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        if ready:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def sleeper(self, session: str) -> subprocess.Popen:
        return self.start([sys.executable, "-c", "import time; time.sleep(60)", f"--session-name={session}"])

    def agent(self, name: str, log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        return self.start(["bash", "-c", f'exec -a "{name}" "$0" -c "$1"', sys.executable, AGENT_CODE],
                          {"STANDIN_LOG": str(log)}, ready=True)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid in self.pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.close()


def _record(exp: Path, *, driver_pid: int, started_here: bool = True, **extra: object) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    atomic_write_json(exp / SESSION_FILE, {"session_dir": f"/tmp/ray/{OURS}", "session_name": OURS,
                                           "driver_pid": driver_pid, "started_here": started_here, **extra})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ray_clean_ends_only_the_recorded_session(tmp_path: Path, procs: Processes) -> None:
    """Two command-line stand-ins of our session and one of another: the dry run lists ours by pid
    and ends nothing; the clean ends ours with SIGTERM (exit by signal 15), lists each, and leaves the
    other running."""
    ours = [procs.sleeper(OURS), procs.sleeper(OURS)]
    other = procs.sleeper(OTHER)
    _record(tmp_path / "exp", driver_pid=_dead_pid())
    assert session_processes(OURS) == sorted(p.pid for p in ours)
    out = CliRunner().invoke(app, ["ray-clean", str(tmp_path / "exp"), "--dry-run"])
    assert out.exit_code == 0 and f"would end 2 process(es) of Ray session {OURS}" in out.output
    assert all(f"pid {p.pid} python" in out.output for p in ours), out.output
    assert all(p.poll() is None for p in ours)
    out = CliRunner().invoke(app, ["ray-clean", str(tmp_path / "exp"), "--grace", str(GRACE)])
    assert out.exit_code == 0, out.output
    assert all(p.wait(timeout=10) == -signal.SIGTERM for p in ours)
    assert all(f"pid {p.pid} python" in out.output and "(SIGTERM)" in out.output for p in ours)
    assert "ended 2 process(es)" in out.output
    assert other.poll() is None


def test_ray_clean_finds_renamed_agents_workers_and_recorded_processes(tmp_path: Path, procs: Processes) -> None:
    """What the command line alone missed (a killed driver left ``ray::DashboardAgent`` and
    ``ray::RuntimeEnvAgent`` running after "ended 0 process(es)"):

    * two renamed agents that ignore SIGTERM and hold a log file of our session open: found, sent
      SIGTERM, still running after the grace period, ended by SIGKILL (exit by signal 9), and listed
      by pid and name with the SIGKILL;
    * a worker started by a stand-in raylet (its command line names nothing, it holds no session
      file): found as the raylet's child and ended;
    * a process recorded with the session (pid and start time in ``ray_session.json``), with no other
      mark: ended;
    * untouched: a renamed agent holding a file of another session, and a process whose pid is
      recorded with another start time (a reused pid).
    """
    session_dir = tmp_path / "ray" / OURS
    dashboard = procs.agent("ray::DashboardAgent", session_dir / "logs" / "dashboard_agent.log")
    runtime_env = procs.agent("ray::RuntimeEnvAgent", session_dir / "logs" / "runtime_env_agent.log")
    raylet = procs.start([sys.executable, "-c", RAYLET_CODE, f"--session-name={OURS}"])
    assert raylet.stdout is not None
    worker_pid = int(raylet.stdout.readline())
    procs.pids.append(worker_pid)
    recorded = procs.sleeper("nothing-to-see")
    reused = procs.sleeper("nothing-to-see-either")
    foreign = procs.agent("ray::DashboardAgent", tmp_path / "ray" / OTHER / "logs" / "dashboard_agent.log")
    started = {p.pid: psutil.Process(p.pid).create_time() for p in (recorded, reused)}
    _record(tmp_path / "exp", driver_pid=_dead_pid(),
            processes=[{"pid": recorded.pid, "name": "python", "started": started[recorded.pid]},
                       {"pid": reused.pid, "name": "python", "started": started[reused.pid] - 1000.0}])

    ours = {dashboard.pid, runtime_env.pid, raylet.pid, worker_pid, recorded.pid}
    out = CliRunner().invoke(app, ["ray-clean", str(tmp_path / "exp"), "--grace", str(GRACE)])
    assert out.exit_code == 0, out.output
    assert f"ended {len(ours)} process(es) of Ray session {OURS}:" in out.output
    assert f"pid {dashboard.pid} ray::DashboardAgent (SIGKILL: it ignored SIGTERM)" in out.output
    assert f"pid {runtime_env.pid} ray::RuntimeEnvAgent (SIGKILL: it ignored SIGTERM)" in out.output
    for pid in (raylet.pid, worker_pid, recorded.pid):
        assert f"pid {pid} python (SIGTERM)" in out.output, out.output
    assert dashboard.wait(timeout=10) == -signal.SIGKILL and runtime_env.wait(timeout=10) == -signal.SIGKILL
    assert raylet.wait(timeout=10) == -signal.SIGTERM and recorded.wait(timeout=10) == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while not _ended(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(worker_pid)
    assert foreign.poll() is None and reused.poll() is None
    assert str(foreign.pid) not in out.output and str(reused.pid) not in out.output
    assert find_session_processes(OURS) == []


def test_ray_clean_refuses_a_running_driver_and_a_joined_cluster(tmp_path: Path, procs: Processes) -> None:
    """A live driver is refused: one recorded with its start time, and (older records) one whose
    command line calls ``run_sweep``; a pid recorded with another start time is not the driver (its
    pid was reused). A record of a joined cluster (``started_here`` false) ends nothing; no record is
    an error naming the file."""
    ours = procs.sleeper(OURS)
    driver = procs.start([sys.executable, "-c", "import time; time.sleep(60)", "run_sweep"])
    started = psutil.Process(driver.pid).create_time()
    _record(tmp_path / "live", driver_pid=driver.pid)
    with pytest.raises(DriverStillRunsError, match="still runs"):
        clean_ray_session(tmp_path / "live")
    plain = procs.sleeper("not-a-driver")
    _record(tmp_path / "timed", driver_pid=plain.pid, driver_started=psutil.Process(plain.pid).create_time())
    with pytest.raises(DriverStillRunsError, match=f"pid {plain.pid}"):
        clean_ray_session(tmp_path / "timed", dry_run=True)
    out = CliRunner().invoke(app, ["ray-clean", str(tmp_path / "timed")])
    assert out.exit_code == 2 and "still runs; stop it first" in out.output and "Traceback" not in out.output
    _record(tmp_path / "reused", driver_pid=driver.pid, driver_started=started - 1000.0)
    assert [p.pid for p in clean_ray_session(tmp_path / "reused", dry_run=True).processes] == [ours.pid]

    _record(tmp_path / "joined", driver_pid=_dead_pid(), started_here=False)
    report = clean_ray_session(tmp_path / "joined")
    assert report.processes == () and "joined" in report.skipped
    assert ours.poll() is None
    with pytest.raises(FileNotFoundError, match=SESSION_FILE):
        clean_ray_session(tmp_path / "nothing")


@pytest.mark.parametrize(("content", "expected"), [
    ('{"session_name": "session_2099', "unreadable Ray session record"),
    ('{"session_name": "session_2099-01-01_00-00-00_1", "started_here": true}', "field 'driver_pid'"),
    ('{"session_name": "", "driver_pid": 1, "started_here": true}', "expected 'session_<date>_<pid>'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_damaged_record_is_an_error_naming_the_file(tmp_path: Path, content: str, expected: str) -> None:
    """A truncated, incomplete or odd ``ray_session.json`` ends nothing: exit 2, one line naming the
    file (or the bad session name) and what is wrong, no traceback."""
    (tmp_path / SESSION_FILE).write_text(content)
    out = CliRunner().invoke(app, ["ray-clean", str(tmp_path)])
    assert out.exit_code == 2, out.output
    assert expected in out.output and "Traceback" not in out.output
    if "session_<date>" not in expected:
        assert str(tmp_path / SESSION_FILE) in out.output


def test_bad_session_name_is_refused() -> None:
    """An empty or odd session name would match unrelated processes: refused."""
    with pytest.raises(ValueError, match="session_"):
        session_processes("")


def test_head_command_keeps_dashboard_off() -> None:
    """The head line has the port, CPU count, no GPUs and the dashboard off."""
    cmd = head_command(port=6390, num_cpus=1)
    assert "--port=6390" in cmd and "--num-cpus=1" in cmd and "--num-gpus=0" in cmd
    assert "--include-dashboard=false" in cmd and os.path.basename(cmd[0]).startswith("ray")


#: A sweep driver in miniature: starts a local Ray instance, runs one task (a worker), records the
#: session the way a sweep does, says so, and waits to be killed.
DRIVER_CODE = textwrap.dedent("""
    import os, sys, time
    import ray
    from wsss_tune.trainables.cluster import record_ray_session

    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    ray.get(ray.remote(lambda: os.getpid()).remote())
    record_ray_session(sys.argv[1])
    print("recorded", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_clean_after_a_real_driver_was_killed(tmp_path: Path, procs: Processes) -> None:
    """A real driver starts Ray, records its session (raylet, GCS, agents, worker...), and is killed
    with SIGKILL. ``ray-clean`` then ends whatever of the session still runs (the agents ignore
    SIGTERM and outlive the driver), lists each by pid and name, and afterwards no process of the
    session is left."""
    exp = tmp_path / "exp"
    exp.mkdir()
    driver = procs.start([sys.executable, "-c", DRIVER_CODE, str(exp)],
                         {"RAY_USAGE_STATS_ENABLED": "0"})
    assert driver.stdout is not None and driver.stdout.readline().strip() == "recorded"
    doc = json.loads((exp / SESSION_FILE).read_text())
    names = {p["name"] for p in doc["processes"]}
    assert {"raylet", "gcs_server"} <= names and any(n.startswith("ray::") for n in names), names
    procs.pids.extend(p["pid"] for p in doc["processes"])
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)

    out = CliRunner().invoke(app, ["ray-clean", str(exp), "--grace", "2"])
    assert out.exit_code == 0, out.output
    assert f"of Ray session {doc['session_name']}" in out.output
    lines = [ln.strip() for ln in out.output.splitlines() if ln.strip().startswith("pid ")]
    assert all(ln.endswith(("(SIGTERM)", "(SIGKILL: it ignored SIGTERM)", "(had already exited)")) for ln in lines)
    assert find_session_processes(doc["session_name"], doc["processes"]) == []
