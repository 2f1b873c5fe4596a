"""A real two-node Ray cluster on loopback: a sweep joins it with ``address``, trials run on both
nodes, and a trial whose node is killed mid-training is rescheduled and finishes on the head.

The head and the worker are ``ray start --block`` processes (the commands of
:mod:`trainables.cluster`, dashboard off, token auth as Ray sets it up), each in its own process
group and its own temp folder, so killing the worker's group kills that node only, and the finally
block ends exactly the processes this test started (its groups, then anything left that names its
Ray session). Experiments and the artifact store live in the test's folder, which both nodes reach.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsss_tune.analysis import load_experiment
from wsss_tune.trainables.cluster import head_command, session_processes, worker_command
from wsss_tune.trainables.trainable import NODE_KEY

#: Seconds allowed for a node to register, for the sweep's trials to reach a checkpoint, and for
#: the whole sweep.
NODE_TIMEOUT_S = 60
CHECKPOINT_TIMEOUT_S = 180
SWEEP_TIMEOUT_S = 300
#: Custom resource that marks the worker node (the brief's ``--resources='{"worker_node": 1}'``).
WORKER_RESOURCE = "worker_node"
#: EPS steps per trial and the checkpoint interval: long enough to kill the worker after its trial
#: saved a checkpoint and before it finished.
EPS_ITERATIONS = 120
CHECKPOINT_EVERY = 10

_SWEEP = textwrap.dedent("""
    import json, sys
    from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep
    args = json.loads(sys.argv[1])
    run_sweep("synth_eps", data=args["data"], storage=args["storage"], name="cluster", store=args["store"],
              address=args["address"], trials=2, max_concurrent=2, max_failures=1, cpus_per_trial=1,
              wandb="off", progress="off", overrides={**SMOKE_OVERRIDES, **args["overrides"]}, reseed=None)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _session_name(temp_dir: str) -> str:
    latest = Path(temp_dir) / "session_latest"
    return latest.resolve().name if latest.exists() else ""


_NODES = textwrap.dedent("""
    import json, sys, time
    import ray
    address, count, resource, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    ray.init(address=address, log_to_driver=False)
    deadline = time.monotonic() + timeout
    while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    print(json.dumps({("worker" if resource in n["Resources"] else "head"): n["NodeID"] for n in nodes}))
""")


def _wait_nodes(address: str, count: int, env: dict[str, str]) -> dict[str, str]:
    """Node ids once ``count`` nodes registered: ``{"head": id, "worker": id}`` (asked by a separate
    driver, so this process never connects to the cluster)."""
    out = subprocess.run([sys.executable, "-c", _NODES, address, str(count), WORKER_RESOURCE, str(NODE_TIMEOUT_S)],
                         env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT_S + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"could not list the cluster's nodes: {out.stderr[-1500:]}")
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    if len(nodes) < count:
        raise TimeoutError(f"{len(nodes)} of {count} Ray nodes registered within {NODE_TIMEOUT_S} s")
    return nodes


def _reports_by_trial(exp_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in exp_dir.glob("*/result.json"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


@pytest.fixture
def cluster() -> Iterator[dict[str, object]]:
    """A head (1 CPU) and a worker (1 CPU, ``worker_node``) on 127.0.0.1; ended in ``finally``."""
    from shutil import which

    if which("ray") is None and not Path(sys.executable).with_name("ray").exists():
        pytest.skip("the `ray` command is not installed next to this Python")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0",
           # `ray start --head` turns token auth on; processes that join (the worker, the drivers) send
           # the token (~/.ray/auth_token, made by the head if missing) only in token mode.
           "RAY_AUTH_MODE": "token"}
    # Short folders: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes.
    head_tmp = tempfile.mkdtemp(prefix="rh")
    worker_tmp = tempfile.mkdtemp(prefix="rw")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        head = subprocess.Popen([*head_command(port=port, num_cpus=1, temp_dir=head_tmp), "--block"], env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(head)
        worker = subprocess.Popen([*worker_command(address=address, num_cpus=1, temp_dir=worker_tmp,
                                                   resources={WORKER_RESOURCE: 1}), "--block"],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        procs.append(worker)
        try:
            nodes = _wait_nodes(address, 2, env)
        except Exception as exc:  # noqa: BLE001 - report why the cluster could not start
            dead = [p.stderr.read().decode()[-1500:] for p in procs if p.poll() is not None]
            pytest.fail(f"two-node cluster did not come up: {exc}; {dead}")
        yield {"address": address, "nodes": nodes, "worker": worker, "env": env}
    finally:
        sessions = {_session_name(d) for d in (head_tmp, worker_tmp)} - {""}
        for proc in reversed(procs):
            _kill_group(proc)
        for name in sessions:  # anything of this test's sessions that left its process group
            for pid in session_processes(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for folder in (head_tmp, worker_tmp):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_spans_two_nodes_and_survives_losing_the_worker(cluster: dict, synth_root: Path,
                                                              tmp_path: Path) -> None:
    """2 trials, 1 CPU each, on a head and a worker of 1 CPU each: one trial runs on each node (each
    result carries the node id). Once the worker's trial saved a checkpoint (stage step >=
    CHECKPOINT_EVERY), the worker node is killed (SIGKILL to its process group). With
    ``max_failures=1`` Tune reschedules that trial on the head once the head's trial is done; it
    resumes from its last checkpoint (every report carries one, so its first result on the head is
    past CHECKPOINT_EVERY and at most one interval after its last step on the worker) and completes.
    trials.parquet: both completed on the head's node id, the moved one with ``num_failures`` 1.
    """
    nodes = cluster["nodes"]
    assert set(nodes) == {"head", "worker"}
    exp_dir = tmp_path / "cluster"
    args = {"data": str(synth_root), "storage": str(tmp_path), "store": str(tmp_path / "store"),
            "address": cluster["address"],
            "overrides": {"eps.iterations": EPS_ITERATIONS, "eps.checkpoint_every": CHECKPOINT_EVERY,
                          "eps.log_every": CHECKPOINT_EVERY, "eps.eval_every": EPS_ITERATIONS}}
    driver = subprocess.Popen([sys.executable, "-c", _SWEEP, json.dumps(args)], env=cluster["env"],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + CHECKPOINT_TIMEOUT_S
        moved = None
        while moved is None:
            for trial_id, rows in _reports_by_trial(exp_dir).items():
                steps = [r.get("stage_step") or 0 for r in rows if r.get(NODE_KEY) == nodes["worker"]]
                if steps and max(steps) >= CHECKPOINT_EVERY:
                    moved = trial_id
            if driver.poll() is not None:
                pytest.fail(f"the sweep ended before the worker was killed: {driver.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no trial checkpointed on the worker within {CHECKPOINT_TIMEOUT_S} s: "
                            f"{ {t: [r.get(NODE_KEY) for r in rs] for t, rs in _reports_by_trial(exp_dir).items()} }")
            time.sleep(0.2)
        _kill_group(cluster["worker"])
        try:
            driver.wait(timeout=SWEEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not finish within {SWEEP_TIMEOUT_S} s of losing the worker")
    finally:
        _kill_group(driver)
    err = driver.stderr.read().decode()

    result = load_experiment(exp_dir)
    assert result.counts["completed"] == 2 and result.counts["total"] == 2, ([t.error for t in result.trials],
                                                                            err[-2000:])
    by_id = {t.trial_id: t for t in result.trials}
    assert by_id[moved].metrics[NODE_KEY] == nodes["head"]
    assert by_id[moved].metrics["num_failures"] == 1
    (other,) = set(by_id) - {moved}
    assert by_id[other].metrics[NODE_KEY] == nodes["head"] and by_id[other].metrics["num_failures"] == 0
    rows = _reports_by_trial(exp_dir)[moved]
    seen = [r.get(NODE_KEY) for r in rows]
    assert nodes["worker"] in seen and seen[-1] == nodes["head"]
    on_head = [r.get("stage_step") for r in rows if r.get(NODE_KEY) == nodes["head"] and r.get("stage_step")]
    on_worker = [r.get("stage_step") for r in rows if r.get(NODE_KEY) == nodes["worker"] and r.get("stage_step")]
    # Resumed from the worker's last checkpoint (every report carries one): from scratch, the head's
    # first report would be step CHECKPOINT_EVERY again.
    assert on_head and CHECKPOINT_EVERY < on_head[0] <= max(on_worker) + CHECKPOINT_EVERY, (on_head, on_worker)
