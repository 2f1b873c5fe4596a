"""Interrupted sweeps: Ctrl-C (SIGINT) of the driver mid-sweep, then ``resume_sweep``.

(SIGKILL of the driver is tests/test_sweep.py::test_resume_after_the_driver_is_killed.) The driver is
a subprocess calling ``run_sweep`` on the session's tiny synthetic dataset; SIGINT goes to the
driver's pid only, as Ray Tune handles it there (a graceful stop, ``fit()`` returns).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wsss_tune.analysis import load_experiment
from wsss_tune.artifacts import ArtifactStore
from wsss_tune.trainables import resume_sweep

#: Trials the interrupted sweep asks for.
TRIALS = 3
#: Seconds allowed for the first trial to finish, and for the driver to stop after SIGINT.
FIRST_TRIAL_TIMEOUT_S = 300
STOP_TIMEOUT_S = 120

_SWEEP = textwrap.dedent("""
    import json, sys
    import ray
    from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep
    args = json.loads(sys.argv[1])
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    run_sweep("synth_eps", data=args["data"], storage=args["storage"], name="interrupted", store=args["store"],
              trials=args["trials"], max_concurrent=1, wandb="off", progress="off",
              overrides={**SMOKE_OVERRIDES, "eps.iterations": 40}, reseed=None)
""")


def _finished_runs(exp_dir: Path) -> set[str]:
    """Trials whose pipeline finished (each writes ``runs/<trial>/metrics.json`` last)."""
    return {p.parent.name for p in (exp_dir / "runs").glob("*/metrics.json")}


def _manifests(store: Path) -> dict[str, float]:
    """Published artifacts of the store: ``stage/digest`` -> creation time (from the manifest)."""
    return {f"{i.key.stage}/{i.key.digest}": i.created for i in ArtifactStore(uri=str(store)).list()}


@pytest.mark.slow
@pytest.mark.ray
def test_sigint_then_resume_keeps_finished_trials_and_reuses_artifacts(synth_root: Path, tmp_path: Path) -> None:
    """synth_eps, 3 trials one at a time (each trains its own EPS: distinct tau/lam), SIGINT to the
    driver once the first trial's pipeline finished.

    * The driver stops by itself (no kill needed) and writes results for what it has: every trial
      finished before the interrupt is ``completed`` in its trials.parquet, fewer than 3 in all.
    * ``resume_sweep`` then runs the rest: 3 trials in total, all completed (the count of an
      uninterrupted run), every trial completed before is still completed, with the same metric.
    * The artifacts published before the interrupt are reused, not rebuilt: each is still in the
      store with its original creation time, and across all trials every EPS artifact was built
      once (sum of ``built/eps_model`` = number of ``eps_model`` artifacts = 3 distinct settings).
    """
    store = tmp_path / "store"
    exp_dir = tmp_path / "interrupted"
    args = {"data": str(synth_root), "storage": str(tmp_path), "store": str(store), "trials": TRIALS}
    proc = subprocess.Popen([sys.executable, "-c", _SWEEP, json.dumps(args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + FIRST_TRIAL_TIMEOUT_S
        while not _finished_runs(exp_dir):
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before the interrupt: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the first trial did not finish within {FIRST_TRIAL_TIMEOUT_S} s")
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver did not stop within {STOP_TIMEOUT_S} s of SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()

    partial = load_experiment(exp_dir)  # written by the interrupted driver itself
    before = {t.trial_id: t for t in partial.trials if t.status == "completed"}
    assert before, err[-2000:]
    assert set(before) <= _finished_runs(exp_dir)
    assert len(before) < TRIALS, "the sweep finished before the interrupt; nothing was left to resume"
    published = _manifests(store)
    assert published

    result = resume_sweep(exp_dir, progress="off")
    assert result.counts["total"] == TRIALS and result.counts["completed"] == TRIALS, \
        [t.error for t in result.trials]
    after = {t.trial_id: t for t in result.trials}
    for trial_id, t in before.items():
        assert after[trial_id].status == "completed"
        assert after[trial_id].value("eps_miou_tune") == t.value("eps_miou_tune")
    now = _manifests(store)
    assert {k: now.get(k) for k in published} == published
    built = sum(t.metrics["built/eps_model"] for t in result.trials)
    assert built == len(ArtifactStore(uri=str(store)).list("eps_model")) == TRIALS
    assert json.loads((exp_dir / "experiment.json").read_text())["counts"]["completed"] == TRIALS
