"""``wsss-tune ray-clean``: ends only the processes of the Ray session a killed sweep recorded.

Ray itself is not started: stand-in processes carry a session name on their command line exactly
where Ray's raylet / workers carry it (``--session-name=session_...``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsss_tune.cli import app
from wsss_tune.trainables.cluster import SESSION_FILE, clean_ray_session, head_command, session_processes
from wsss_tune.utils.io import atomic_write_json

OURS = "session_2099-01-01_00-00-00_424242"
OTHER = "session_2099-01-01_00-00-00_777777"


def _sleeper(session: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--session-name={session}"])


def _record(exp: Path, *, driver_pid: int, started_here: bool = True) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    atomic_write_json(exp / SESSION_FILE, {"session_dir": f"/tmp/ray/{OURS}", "session_name": OURS,
                                           "driver_pid": driver_pid, "started_here": started_here})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_ray_clean_ends_only_the_recorded_session(tmp_path: Path) -> None:
    """Two stand-ins of our session and one of another: the dry run lists ours, the clean ends ours
    (exit by signal) and leaves the other running."""
    ours = [_sleeper(OURS), _sleeper(OURS)]
    other = _sleeper(OTHER)
    try:
        _record(tmp_path / "exp", driver_pid=_dead_pid())
        assert sorted(session_processes(OURS)) == sorted(p.pid for p in ours)
        out = CliRunner().invoke(app, ["ray-clean", str(tmp_path / "exp"), "--dry-run"])
        assert out.exit_code == 0 and "would end 2 process(es)" in out.output
        assert all(p.poll() is None for p in ours)
        out = CliRunner().invoke(app, ["ray-clean", str(tmp_path / "exp")])
        assert out.exit_code == 0, out.output
        assert all(p.wait(timeout=10) < 0 for p in ours)
        assert other.poll() is None
    finally:
        for p in [*ours, other]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_ray_clean_refuses_a_running_driver_and_a_joined_cluster(tmp_path: Path) -> None:
    """A live driver (a process whose command line calls ``run_sweep``) is refused; a record of a joined
    cluster (``started_here`` false) ends nothing; no record is an error naming the file."""
    ours = _sleeper(OURS)
    try:
        driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "run_sweep"])
        try:
            _record(tmp_path / "live", driver_pid=driver.pid)
            with pytest.raises(RuntimeError, match="still runs"):
                clean_ray_session(tmp_path / "live")
        finally:
            driver.kill()
            driver.wait()
        _record(tmp_path / "joined", driver_pid=_dead_pid(), started_here=False)
        assert clean_ray_session(tmp_path / "joined") == []
        assert ours.poll() is None
        with pytest.raises(FileNotFoundError, match=SESSION_FILE):
            clean_ray_session(tmp_path / "nothing")
    finally:
        ours.kill()
        ours.wait()


def test_bad_session_name_is_refused() -> None:
    """An empty or odd session name would match unrelated processes: refused."""
    with pytest.raises(ValueError, match="session_"):
        session_processes("")


def test_head_command_keeps_dashboard_off() -> None:
    """The head line has the port, CPU count, no GPUs and the dashboard off."""
    cmd = head_command(port=6390, num_cpus=1)
    assert "--port=6390" in cmd and "--num-cpus=1" in cmd and "--num-gpus=0" in cmd
    assert "--include-dashboard=false" in cmd and os.path.basename(cmd[0]).startswith("ray")
