"""Safety: no code runs from data files, no config text is evaluated, nothing is downloaded, Ray's
dashboard stays on localhost.
"""

from __future__ import annotations

import ast
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_tune.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
#: Project source folders scanned by the grep tests (tests are left out: they build bad inputs).
SOURCE_DIRS = ("wsss_tune", "trainables", "analysis", "benchmarks")


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else "?"


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class _Payload:
    """Unpickling this runs ``touch marker`` through ``os.system``: the marker file proves that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------------
# Source scans
# --------------------------------------------------------------------------------------------------


def test_sources_found() -> None:
    """The scans below look at the real tree (a wrong REPO would make them vacuous)."""
    names = {p.name for p in _sources()}
    assert {"cli.py", "artifacts.py", "sweep.py", "weights.py"} <= names


def test_every_torch_load_is_weights_only() -> None:
    """Each ``torch.load(...)`` call in the source passes ``weights_only=True``."""
    bad = []
    for path in _sources():
        for call in _calls(ast.parse(path.read_text())):
            if _name(call.func).endswith("torch.load"):
                value = _kw(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_yaml_loaded_safely_and_no_eval() -> None:
    """YAML goes through ``safe_load`` or a ``SafeLoader`` subclass; no ``eval``/``exec``/``pickle.load(s)``
    and no ``np.load(allow_pickle=True)`` anywhere in the source."""
    bad = []
    for path in _sources():
        text = path.read_text()
        tree = ast.parse(text)
        safe_loaders = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                        and any("SafeLoader" in _name(b) for b in n.bases)}
        for call in _calls(tree):
            name = _name(call.func)
            where = f"{path.relative_to(REPO)}:{call.lineno} {name}"
            if name in ("eval", "exec", "builtins.eval", "builtins.exec", "pickle.load", "pickle.loads",
                        "yaml.unsafe_load", "yaml.full_load"):
                bad.append(where)
            elif name == "yaml.load":
                loader = _kw(call, "Loader")
                if loader is None or _name(loader).split(".")[-1] not in safe_loaders | {"SafeLoader", "CSafeLoader"}:
                    bad.append(where)
            elif name.endswith("np.load"):
                value = _kw(call, "allow_pickle")
                if isinstance(value, ast.Constant) and value.value is True:
                    bad.append(where)
    assert not bad, f"unsafe deserialisation or evaluation: {bad}"


def test_ray_dashboard_not_exposed() -> None:
    """Every ``ray.init`` in the source turns the dashboard off or binds it to localhost, and every
    ``ray start`` the project issues (trainables/cluster.py) does the same."""
    found = 0
    for path in _sources():
        for call in _calls(ast.parse(path.read_text())):
            if _name(call.func) == "ray.init":
                found += 1
                dash = _kw(call, "include_dashboard")
                host = _kw(call, "dashboard_host")
                off = isinstance(dash, ast.Constant) and dash.value is False
                local = isinstance(host, ast.Constant) and host.value in ("127.0.0.1", "localhost")
                assert off or local, f"{path.relative_to(REPO)}:{call.lineno}: ray.init exposes the dashboard"
    assert found >= 1
    from wsss_tune.trainables.cluster import DASHBOARD_ARGS, head_command

    cmd = head_command(port=6399, num_cpus=1)
    assert all(a in cmd for a in DASHBOARD_ARGS)
    assert "--include-dashboard=false" in cmd or "--dashboard-host=127.0.0.1" in cmd


# --------------------------------------------------------------------------------------------------
# Malicious files
# --------------------------------------------------------------------------------------------------


def test_malicious_weights_and_checkpoint_do_not_run(tmp_path: Path) -> None:
    """A ``.pth`` whose pickle calls ``os.system`` is refused by the weights reader and by the stage
    checkpoint loader, and the command never runs (its marker file stays absent)."""
    from wsss_tune.models.weights import WeightsError, read_weights
    from wsss_tune.stages.common import CheckpointManager

    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="evil.pth"):
        read_weights(tmp_path / "evil.pth")
    ckpt = CheckpointManager(tmp_path / "ckpt", keep=2)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "evil.pth").rename(ckpt.path(3))
    with pytest.warns(UserWarning, match="unreadable"):
        assert ckpt.latest() is None
    assert not marker.exists()


def test_malicious_label_file_does_not_run(synth_copy: Path, tmp_path: Path) -> None:
    """A ``cls_labels.npy`` pickling an ``os.system`` call is refused with a DataError naming it."""
    from wsss_tune.data import DataError, VOCLayout

    marker = tmp_path / "pwned"
    np.save(synth_copy / "cls_labels.npy", np.array(_Payload(marker), dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"cls_labels\.npy.*posix\.system|cls_labels\.npy.*os\.system"):
        VOCLayout(root=synth_copy).load_cls_labels()
    assert not marker.exists()


def test_reference_label_pickles_still_load(tmp_path: Path) -> None:
    """Protocol 2 (Python 2 era reference files) and 4 pickles of a dict id -> float32[C] read back."""
    from wsss_tune.utils.safe_pickle import load_pickled_npy

    labels = {"2007_000032": np.array([1, 0, 0], np.float32), "2007_000039": np.array([0, 1, 1], np.float32)}
    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}.npy"
        array = np.array(labels, dtype=object)
        with open(path, "wb") as f:  # what np.save writes, with the pickle protocol chosen
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
            pickle.dump(array, f, protocol=protocol)
        got = load_pickled_npy(path)
        assert sorted(got) == sorted(labels)
        assert np.array_equal(got["2007_000039"], labels["2007_000039"])


# --------------------------------------------------------------------------------------------------
# No network
# --------------------------------------------------------------------------------------------------


def test_tiny_pipeline_runs_without_network(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every non-loopback connection refused, a tiny EPS run completes (nothing is downloaded),
    and the guard itself works (a connection to a public address is refused)."""
    from wsss_tune.stages.pipeline import run_pipeline
    from wsss_tune.trainables.sweep import SMOKE_OVERRIDES

    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if self.family == socket.AF_UNIX or str(host) in ("127.0.0.1", "::1", "localhost"):
            return real_connect(self, address)
        attempts.append(address)
        raise ConnectionRefusedError(f"network access blocked in tests: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    attempts.clear()
    cfg = apply_overrides(load_config("synth", [f"data.root={synth_root}"]),
                          {**SMOKE_OVERRIDES, "run.artifact_store": str(tmp_path / "store")})
    metrics = run_pipeline(cfg, stages=("eps",), out_dir=tmp_path / "run")
    assert "eps_miou" in metrics or any(k.startswith("eps") for k in metrics)
    assert attempts == []
