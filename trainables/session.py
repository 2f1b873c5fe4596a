"""The Ray session of a sweep's driver: the Ray instance, the driver's environment, the resource check.

:func:`ray_session` uses a running Ray instance, joins a cluster or starts a local one (recorded in
the experiment folder for ``wsss-tune ray-clean``); :func:`tune_env` sets the environment Tune and
W&B read in the driver for the length of a sweep; :func:`check_resources` refuses a sweep whose
trials could never start on the cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .cluster import record_ray_session

__all__ = ["AUTH_MODE_ENV", "ray_session", "tune_env", "check_resources"]

#: Ray's authentication mode variable (``token`` or ``disabled``).
AUTH_MODE_ENV = "RAY_AUTH_MODE"
#: Ray's logger and the start of its notice when it turns token authentication on by default.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


@contextlib.contextmanager
def ray_session(address: str | None, *, log_to_driver: bool, exp_dir: Path | None = None) -> Iterator[None]:
    """Use a running Ray instance, join ``address``, or start a local one (stopped at the end).

    The session is recorded in ``exp_dir`` so that ``wsss-tune ray-clean EXP`` can end exactly the
    processes this driver started if it is killed.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    with _quiet_default_auth_notice(address):
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    if exp_dir is not None:
        record_ray_session(exp_dir)
    try:
        yield
    finally:
        ray.shutdown()


class _DropDefaultAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_AUTH_NOTICE)


@contextlib.contextmanager
def _quiet_default_auth_notice(address: str | None) -> Iterator[None]:
    """Start of a local Ray instance without Ray's notice that token authentication is on.

    Ray 2.60 turns token authentication on for every local instance it starts (a token in
    ``~/.ray/auth_token``, made on first use) and says so on every start. For an instance a sweep
    starts on this machine that is the expected, safe default, so the notice is dropped; setting
    ``RAY_AUTH_MODE`` (``token`` or ``disabled``) is the user's explicit choice and Ray says nothing
    then either. Joining a cluster (``address``) keeps every message of Ray's.
    """
    if address is not None or AUTH_MODE_ENV in os.environ:
        yield
        return
    target = logging.getLogger(_AUTH_LOGGER)
    drop = _DropDefaultAuthNotice()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


@contextlib.contextmanager
def tune_env(wandb: str, progress: str) -> Iterator[None]:
    """Environment of the Tune driver during a sweep (restored afterwards).

    Intermediate results carry the searched metric only when a stage evaluates it, so Tune's
    "every result must hold the metric" check is off; ``WANDB_MODE=offline`` without an account;
    unless ``progress`` is ``ray``, Tune's console output is off (its newer output engine prints a
    header even at verbosity 0).
    All of these are read by the driver process (W&B's mode also goes to ``wandb.init`` directly, so
    it reaches the logging workers of a cluster joined by ``address``).
    """
    values = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
              # Every training checkpoint becomes a Tune checkpoint; the snapshot-frequency warning
              # that follows is expected.
              "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    if wandb == "offline":
        values["WANDB_MODE"] = "offline"
    if progress != "ray":
        values["RAY_AIR_NEW_OUTPUT"] = "0"
    if wandb != "off":
        values["WANDB_SILENT"] = "true"
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_resources(cpus: float, gpus: float) -> None:
    """The Ray cluster can hold one trial of ``cpus`` CPUs and ``gpus`` GPUs.

    Raises:
        ValueError: it cannot (no trial could ever start).
    """
    import ray

    have = ray.cluster_resources()
    if have.get("CPU", 0) < cpus or have.get("GPU", 0) < gpus:
        raise ValueError(f"a trial asks for {cpus} CPU and {gpus} GPU, but the Ray cluster has "
                         f"{have.get('CPU', 0)} CPU and {have.get('GPU', 0)} GPU; no trial could ever start")
