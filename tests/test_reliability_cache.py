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


def test_cache_ls_and_gc_of_a_missing_store_are_errors(tmp_path: Path) -> None:
    """A store that does not exist (a mistyped path) is an error naming it (exit 2), not "0 artifact(s)";
    nothing is created. A regular file in its place is named the same way."""
    for command in (["cache", "ls"], ["cache", "gc"], ["cache", "gc", "--dry-run"]):
        out = CliRunner().invoke(app, [*command, str(tmp_path / "nostore")])
        assert out.exit_code == 2, out.output
        assert f"error: artifact store {tmp_path / 'nostore'} does not exist" in out.stderr
        assert "0 artifact(s)" not in out.output and not (tmp_path / "nostore").exists()
    (tmp_path / "file").write_text("not a store")
    out = CliRunner().invoke(app, ["cache", "ls", str(tmp_path / "file")])
    assert out.exit_code == 2 and f"artifact store {tmp_path / 'file'} is not a folder" in out.stderr


def _flip_one_byte(folder: Path, name: str) -> Path:
    """Flip one byte in the middle of ``name`` inside the published artifact ``folder`` (same size:
    only the SHA-256 check sees it)."""
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_trial_counts_and_reports_cache_repairs(synth_root: Path, tmp_path: Path) -> None:
    """A trial reports ``cache_repairs``: corrupted artifacts it found in the shared store and rebuilt.

    EPS only, smoke settings (tests/test_trainables.py has the same trial). Trial t0 builds
    ``eps_model`` and ``eps``: 0 repairs in every result. One byte of the model checkpoint and one of
    a pseudo mask are flipped; trial t1 with the same config finds both artifacts corrupted (SHA-256
    mismatch), rebuilds both: its final result says 2, every result it sent carries the count so far
    (non-decreasing, ending at 2), and its run's metrics equal t0's (the same computation again).
    Trial t2 is then served from the repaired store: 0 repairs, nothing built."""
    from wsss_tune.config import load_config, to_dict
    from wsss_tune.trainables import SETTINGS_KEY, SMOKE_OVERRIDES, TrialSettings, run_trial
    from wsss_tune.trainables.reporter import CACHE_REPAIRS_KEY

    base = load_config("synth", {**SMOKE_OVERRIDES, "data.root": str(synth_root)})
    settings = TrialSettings(base=to_dict(base), stages=("eps",), runs_dir=str(tmp_path / "runs"),
                             store=str(tmp_path / "store"), metric="eps_miou_tune", threads=1)
    config = {"eps.tau": 0.35, SETTINGS_KEY: settings.to_dict()}
    results: dict[str, list[dict]] = {"t0": [], "t1": [], "t2": []}

    first = run_trial(config, trial_id="t0", report_fn=lambda r, **_: results["t0"].append(dict(r)))
    assert first[CACHE_REPAIRS_KEY] == 0 and {r[CACHE_REPAIRS_KEY] for r in results["t0"]} == {0}
    store = ArtifactStore(uri=str(tmp_path / "store"))
    arts = {i.key.stage: Path(i.location) for i in store.list()}
    assert set(arts) == {"eps_model", "eps"}
    _flip_one_byte(arts["eps_model"], "model.pt")
    mask = sorted((arts["eps"] / "masks").iterdir())[0]
    _flip_one_byte(arts["eps"], f"masks/{mask.name}")

    second = run_trial(config, trial_id="t1", report_fn=lambda r, **_: results["t1"].append(dict(r)))
    assert second[CACHE_REPAIRS_KEY] == 2 and second["stages_built"] == 2
    counts = [r[CACHE_REPAIRS_KEY] for r in results["t1"]]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 2
    assert second["eps_miou_tune"] == first["eps_miou_tune"]

    third = run_trial(config, trial_id="t2", report_fn=lambda r, **_: results["t2"].append(dict(r)))
    assert third[CACHE_REPAIRS_KEY] == 0 and third["stages_built"] == 0


def test_store_counts_a_repair_only_when_it_rebuilds(tmp_path: Path) -> None:
    """The store's own count: a corrupted artifact rebuilt by ``get_or_create`` is one repair, named
    with what was wrong; a missing artifact built for the first time, a hit, and a read of a
    corrupted artifact with ``get`` (which only refuses it) are none."""
    store = _store(tmp_path)  # builds two artifacts: no repair
    key = store.key("eps", {"i": 0})
    assert store.repairs == 0 and store.get(key) is not None
    _flip_one_byte(store.get(key), "x.bin")
    assert store.get(key) is None and store.repairs == 0
    art = store.get_or_create(key, lambda d: (d / "x.bin").write_bytes(b"\0" * SIZES[0]) and None)
    assert not art.hit and store.repairs == 1
    assert store.repaired == [(str(key), "x.bin: sha256 differs from the manifest")]
    assert store.get_or_create(key, lambda d: None).hit and store.repairs == 1
    assert store.stats()["repairs"] == 1
