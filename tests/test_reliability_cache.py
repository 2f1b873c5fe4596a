"""``wsss-tune cache ls`` / ``cache gc`` over an artifact store (the store itself: tests/test_artifacts.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsss_tune.artifacts import ArtifactStore
from wsss_tune.cli import _age_seconds, app

#: Bytes written by each build below: two artifacts of 1,000 and 3,000 bytes -> 4.0 kB listed.
SIZES = (1000, 3000)


def _store(tmp_path: Path) -> ArtifactStore:
    store = ArtifactStore(uri=str(tmp_path / "store"))
    for i, n in enumerate(SIZES):
        store.get_or_create(store.key("eps", {"i": i}), lambda d, n=n: (d / "x.bin").write_bytes(b"\0" * n) and None)
    return store


def test_cache_ls_lists_every_artifact(tmp_path: Path) -> None:
    """Two eps artifacts of 1,000 + 3,000 bytes: two rows, 4.0 kB in total; ``--stage rw`` lists none."""
    _store(tmp_path)
    out = CliRunner().invoke(app, ["cache", "ls", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    assert out.output.count("eps/") == 2 and "2 artifact(s), 4.0 kB" in out.output
    out = CliRunner().invoke(app, ["cache", "ls", str(tmp_path / "store"), "--stage", "rw"])
    assert "0 artifact(s)" in out.output


def test_cache_gc_older_than_and_dry_run(tmp_path: Path) -> None:
    """An artifact made now is not older than 1 day (kept); with ``--older-than 0`` it goes, but a
    ``--dry-run`` only reports it."""
    store = _store(tmp_path)
    root = str(tmp_path / "store")
    out = CliRunner().invoke(app, ["cache", "gc", root, "--older-than", "1d"])
    assert out.exit_code == 0 and "removed 0 artifact(s)" in out.output and len(store.list()) == 2
    time.sleep(0.05)
    out = CliRunner().invoke(app, ["cache", "gc", root, "--older-than", "0", "--dry-run"])
    assert "would remove 2 artifact(s), 4.0 kB" in out.output and len(store.list()) == 2
    out = CliRunner().invoke(app, ["cache", "gc", root, "--older-than", "0"])
    assert "removed 2 artifact(s), 4.0 kB" in out.output and store.list() == []


def test_cache_gc_bad_age_is_named(tmp_path: Path) -> None:
    """``--older-than soon`` fails with exit 2 naming the value and the expected form."""
    out = CliRunner().invoke(app, ["cache", "gc", str(tmp_path), "--older-than", "soon"])
    assert out.exit_code == 2 and "'soon'" in out.output and "7d" in out.output


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800)])
def test_age_units(text: str, seconds: float) -> None:
    """30m = 30*60 = 1,800 s; 12h = 12*3,600 = 43,200 s; 7d = 7*86,400 = 604,800 s."""
    assert _age_seconds(text) == seconds


def test_cache_gc_cleans_a_killed_writer(tmp_path: Path) -> None:
    """A process that dies half-way through writing an artifact leaves a ``.tmp`` build folder; it is
    never listed, ``cache gc`` removes it (no ``--older-than`` needed), the published artifacts stay,
    and the same key then builds normally."""
    store = _store(tmp_path)
    key = store.key("eps", {"i": 99})
    pid = os.fork()
    if pid == 0:  # child: write half an artifact, then die without any clean-up
        try:
            store.get_or_create(key, lambda d: (d / "half.bin").write_bytes(b"\1") and os._exit(9))
        finally:
            os._exit(9)
    os.waitpid(pid, 0)
    leftovers = [p for p in (tmp_path / "store").rglob("*.tmp")]
    assert leftovers and len(store.list()) == 2
    out = CliRunner().invoke(app, ["cache", "gc", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    assert len(store.list()) == 2 and not any(p.exists() for p in leftovers)
    art = store.get_or_create(key, lambda d: (d / "whole.bin").write_bytes(b"\2") and None, wait_timeout=30)
    assert (art.path / "whole.bin").read_bytes() == b"\2"
