"""Stage-artifact store: keys, publish/verify/rebuild, locking across processes, listing and gc.

Every behaviour runs against the three kinds of store: a plain local path (OS locks, rename into
place), a ``file://`` URI and a pyarrow ``SubTreeFileSystem`` (leases, upload with the manifest last,
a local cache).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from wsss_tune.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    ArtifactKey,
    ArtifactStore,
    ArtifactWaitTimeout,
    _Owner,
)
from wsss_tune.config import EPSConfig, config_hash
from wsss_tune.utils.procs import alive, find_process, start_time

BACKENDS = ["local", "file_uri", "subtree"]
#: Short timings so that takeovers happen within a test: heartbeat every 0.1 s, dead after 1 s.
FAST = {"heartbeat": 0.1, "stale_after": 1.0, "lease_settle": 0.05}
#: SHA-256 of b"abc": the FIPS 180-2 test vector.
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def store_kwargs(backend: str, tmp_path: Path, cache: str = "cache") -> dict[str, Any]:
    if backend == "local":
        return {"uri": str(tmp_path / "store"), **FAST}
    if backend == "file_uri":
        return {"uri": (tmp_path / "store").as_uri(), "cache_dir": str(tmp_path / cache), **FAST}
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    return {"uri": "store", "filesystem": sub, "cache_dir": str(tmp_path / cache), **FAST}


def make(backend: str, tmp_path: Path, cache: str = "cache", **extra: Any) -> ArtifactStore:
    return ArtifactStore(**{**store_kwargs(backend, tmp_path, cache), **extra})


def published(tmp_path: Path, key: ArtifactKey) -> Path:
    """Where the store itself keeps ``key`` (the same folder for all three backends here)."""
    return tmp_path / "store" / key.stage / key.digest


def temp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


def build_payload(content: bytes = b"abc", counter: list[int] | None = None):
    def build(folder: Path) -> dict[str, Any]:
        if counter is not None:
            counter.append(1)
        (folder / "a.txt").write_bytes(content)
        (folder / "sub").mkdir()
        (folder / "sub" / "zeros.bin").write_bytes(bytes(10))
        return {"eps_miou": 0.66}

    return build


# --------------------------------------------------------------------------------------------------
# keys and construction
# --------------------------------------------------------------------------------------------------


def test_key_is_stage_plus_config_hash(tmp_path: Path) -> None:
    """``key('eps', cfg, d)`` prints as ``eps/`` + ``config_hash(cfg, d)``; dict order does not matter,
    any upstream change (tau 0.4 -> 0.3) or another stage gives another key, and text round-trips."""
    store = ArtifactStore(uri=str(tmp_path))
    cfg = EPSConfig()
    key = store.key("eps", cfg, {"a": 1, "b": 2})
    assert str(key) == f"eps/{config_hash(cfg, {'a': 1, 'b': 2})}"
    assert key == store.key("eps", cfg, {"b": 2, "a": 1})
    assert key != store.key("eps", dataclasses.replace(cfg, tau=0.3), {"a": 1, "b": 2})
    assert key != store.key("affinity", cfg, {"a": 1, "b": 2})
    assert ArtifactKey.parse(str(key)) == key
    assert key.parts[0]["__type__"] == "EPSConfig" and key.parts[0]["tau"] == 0.4


@pytest.mark.parametrize("stage", ["", ".locks", "../eps", "eps/x", "_eps"])
def test_key_rejects_bad_stage_names(tmp_path: Path, stage: str) -> None:
    with pytest.raises(ValueError, match="artifact stage"):
        ArtifactStore(uri=str(tmp_path)).key(stage, 1)


def test_key_rejects_parts_without_stable_text(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\[1\]: object"):
        ArtifactStore(uri=str(tmp_path)).key("eps", 1, object())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"uri": ""}, "uri"),
        ({"uri": "x", "verify": "md5"}, "verify='md5'"),
        ({"uri": "x", "heartbeat": 10.0, "stale_after": 15.0}, "stale_after=15.0"),
        ({"uri": "nosuchscheme://bucket/x"}, "nosuchscheme"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ArtifactStore(**kwargs)


def test_relative_local_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore(uri="rel/store")
    art = store.get_or_create(store.key("eps", 1), build_payload())
    monkeypatch.chdir("/")  # a Ray trial runs in another directory
    assert art.path == tmp_path / "rel" / "store" / "eps" / art.key.digest
    assert store.get(art.key) == art.path


# --------------------------------------------------------------------------------------------------
# publish, hit, verify
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_then_hit_with_manifest(backend: str, tmp_path: Path) -> None:
    """First call builds (miss), the second reuses it (hit) without building. The manifest lists
    a.txt = b"abc" (3 bytes, the FIPS 180-2 sha256 vector) and sub/zeros.bin (10 bytes), plus the
    build's metadata and the key parts. Stats: 1 hit, 1 miss, 1 artifact of 3 + 10 = 13 bytes."""
    store = make(backend, tmp_path)
    key = store.key("eps", {"tau": 0.4})
    calls: list[int] = []
    first = store.get_or_create(key, build_payload(counter=calls))
    assert not first.hit and len(calls) == 1
    files = first.manifest["files"]
    assert files["a.txt"] == {"size": 3, "sha256": SHA256_ABC}
    assert files["sub/zeros.bin"]["size"] == 10
    assert first.metadata == {"eps_miou": 0.66}
    assert first.manifest["parts"] == [{"tau": 0.4}]
    assert first.build_seconds >= 0.0

    second = store.get_or_create(key, build_payload(counter=calls))
    assert second.hit and len(calls) == 1
    assert second.path == first.path and (second.path / "a.txt").read_bytes() == b"abc"
    assert store.exists(key) and store.get(key) == first.path
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["artifacts"], stats["bytes"]) == (1, 1, 1, 13)

    # Another process's view of the same store (its own cache) hits too.
    other = make(backend, tmp_path, cache="cache_other")
    third = other.get_or_create(key, build_payload(counter=calls))
    assert third.hit and len(calls) == 1 and (third.path / "sub" / "zeros.bin").read_bytes() == bytes(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_build_publishes_nothing_and_releases_the_lock(backend: str, tmp_path: Path) -> None:
    store = make(backend, tmp_path)
    key = store.key("eps", 1)

    def bad(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.get_or_create(key, bad)
    assert not store.exists(key) and store.get(key) is None and store.list() == []
    assert temp_leftovers(tmp_path) == []
    # The lock is free: a fresh caller builds at once instead of waiting for a holder.
    art = make(backend, tmp_path, cache="cache_other").get_or_create(key, build_payload(), wait_timeout=0.5)
    assert not art.hit


@pytest.mark.parametrize("backend", ["local", "file_uri"])
@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        ({"bad": object()}, TypeError, "not JSON-serialisable"),
        ([1, 2], TypeError, "returned list"),
        ("symlink", ArtifactError, "symlink"),
        ("manifest", ArtifactError, "reserves"),
    ],
)
def test_bad_build_output_is_rejected(backend: str, tmp_path: Path, result: Any, error: type, match: str) -> None:
    store = make(backend, tmp_path)
    key = store.key("eps", 2)

    def build(folder: Path) -> Any:
        (folder / "a.txt").write_bytes(b"abc")
        if result == "symlink":
            (folder / "link").symlink_to(folder / "a.txt")
            return None
        if result == "manifest":
            (folder / MANIFEST_NAME).write_text("{}")
            return None
        return result

    with pytest.raises(error, match=match):
        store.get_or_create(key, build)
    assert not store.exists(key) and temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_artifact_is_detected_and_rebuilt(backend: str, tmp_path: Path, damage: str) -> None:
    """a.txt = b"abc": truncated to b"ab" (size 2 != 3), flipped to b"abd" (same size, sha256
    differs) or deleted. Each makes ``get`` return None and ``get_or_create`` rebuild it."""
    store = make(backend, tmp_path)
    key = store.key("eps", 3)
    calls: list[int] = []
    store.get_or_create(key, build_payload(counter=calls))
    target = published(tmp_path, key) / "a.txt"
    if damage == "truncate":
        target.write_bytes(b"ab")
    elif damage == "flip":
        target.write_bytes(b"abd")
    else:
        target.unlink()

    fresh = make(backend, tmp_path, cache="cache_fresh")  # no verified local copy to fall back on
    assert fresh.exists(key)  # published, but not trusted:
    assert fresh.get(key) is None
    art = fresh.get_or_create(key, build_payload(counter=calls))
    assert not art.hit and len(calls) == 2
    assert (art.path / "a.txt").read_bytes() == b"abc"
    assert make(backend, tmp_path, cache="cache_third").get(key) is not None


def test_size_only_verification_misses_same_size_damage(tmp_path: Path) -> None:
    """The documented trade-off of ``verify='size'``: b"abc" -> b"abd" keeps 3 bytes and passes."""
    store = make("local", tmp_path, verify="size")
    key = store.key("eps", 4)
    store.get_or_create(key, build_payload())
    (published(tmp_path, key) / "a.txt").write_bytes(b"abd")
    assert store.get(key) is not None
    assert make("local", tmp_path).get(key) is None


@pytest.mark.parametrize("backend", ["file_uri", "subtree"])
def test_damaged_cache_copy_is_downloaded_again(backend: str, tmp_path: Path) -> None:
    store = make(backend, tmp_path)
    key = store.key("eps", 5)
    calls: list[int] = []
    art = store.get_or_create(key, build_payload(counter=calls))
    (art.path / "a.txt").write_bytes(b"a")  # the local copy, not the store
    assert store.get(key) == art.path
    assert (art.path / "a.txt").read_bytes() == b"abc" and len(calls) == 1


@pytest.mark.parametrize("backend", ["file_uri", "subtree"])
def test_upload_without_manifest_is_not_trusted(backend: str, tmp_path: Path) -> None:
    """A crash mid-upload leaves files but no manifest: not listed, not returned, rebuilt (and the
    stray file is gone); ``gc()`` deletes such a folder for a key nobody is building."""
    store = make(backend, tmp_path)
    key, orphan = store.key("eps", 6), store.key("eps", 7)
    for k in (key, orphan):
        published(tmp_path, k).mkdir(parents=True)
        (published(tmp_path, k) / "stray.bin").write_bytes(b"from a crashed upload")
    assert not store.exists(key) and store.get(key) is None and store.list() == []
    art = store.get_or_create(key, build_payload())
    assert not art.hit
    assert sorted(p.name for p in published(tmp_path, key).iterdir()) == [MANIFEST_NAME, "a.txt", "sub"]
    report = store.gc()
    assert report.removed == () and str(published(tmp_path, orphan)).endswith(report.cleaned[0])
    assert not published(tmp_path, orphan).exists() and store.get(key) is not None


# --------------------------------------------------------------------------------------------------
# several processes
# --------------------------------------------------------------------------------------------------


def _race_worker(kwargs: dict[str, Any], counter: str, barrier: Any, results: Any) -> None:
    store = ArtifactStore(**kwargs)
    key = store.key("eps", {"shared": True})

    def build(folder: Path) -> dict[str, Any]:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough that every other process arrives while this one builds
        (folder / "payload.bin").write_bytes(f"built by {os.getpid()}".encode())
        return {"builder": os.getpid()}

    barrier.wait()
    art = store.get_or_create(key, build, poll=0.05, wait_timeout=30)
    results.put((art.hit, (art.path / "payload.bin").read_bytes()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", ["missing", "corrupted"])
def test_concurrent_processes_build_once(backend: str, start: str, tmp_path: Path) -> None:
    """6 processes ask for one missing artifact at the same moment: the build runs once (one line
    in the counter file), one process reports a miss, five a hit, and all read the same bytes.
    file_uri: the processes share one cache folder (one host); subtree: each has its own (hosts).
    Starting from a published but truncated artifact instead of none changes nothing."""
    n = 6
    if start == "corrupted":
        store = make(backend, tmp_path, cache="cache_setup")
        key = store.key("eps", {"shared": True})

        def old_build(folder: Path) -> None:
            (folder / "payload.bin").write_bytes(b"old payload")

        store.get_or_create(key, old_build)
        (published(tmp_path, key) / "payload.bin").write_bytes(b"old")
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    counter = tmp_path / "builds.txt"
    kwargs = store_kwargs(backend, tmp_path)
    procs = []
    for i in range(n):
        if backend == "subtree":
            kwargs = {**kwargs, "cache_dir": str(tmp_path / f"cache{i}")}
        procs.append(ctx.Process(target=_race_worker, args=(kwargs, str(counter), barrier, results)))
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1
    assert sorted(hit for hit, _ in got) == [False] + [True] * (n - 1)
    assert len({payload for _, payload in got}) == 1


def _hold(kwargs: dict[str, Any], marker: str) -> None:
    """Take the lock for eps/{"held": 1} and build until killed."""
    store = ArtifactStore(**kwargs)

    def build(folder: Path) -> None:
        (folder / "partial.bin").write_bytes(b"x" * 100)
        Path(marker).write_text("building")
        time.sleep(60)

    store.get_or_create(store.key("eps", {"held": 1}), build)


def _start_holder(backend: str, tmp_path: Path) -> Any:
    """A separate (forked) process that is building eps/{"held": 1} when this returns."""
    marker = tmp_path / "building.txt"
    kwargs = store_kwargs(backend, tmp_path)  # same host: same cache folder as the test's store
    proc = mp.get_context("fork").Process(target=_hold, args=(kwargs, str(marker)))
    proc.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.is_alive(), "holder process exited early"
        assert time.monotonic() < deadline, "holder process never started building"
        time.sleep(0.02)
    return proc


def _stop(proc: Any) -> None:
    """SIGKILL: no ``finally`` or ``atexit`` runs in the holder."""
    if proc.exitcode is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)


@pytest.mark.parametrize("backend", ["local", "file_uri"])
def test_sigkilled_builder_leaves_nothing_trusted(backend: str, tmp_path: Path) -> None:
    """While a live process builds, a second caller waits and times out naming it. After SIGKILL
    (no cleanup runs) nothing is published, and the next call takes over and rebuilds."""
    store = make(backend, tmp_path)
    key = store.key("eps", {"held": 1})
    proc = _start_holder(backend, tmp_path)
    try:
        with pytest.raises(ArtifactWaitTimeout, match=f"pid {proc.pid}"):
            store.get_or_create(key, build_payload(), wait_timeout=0.3, poll=0.05)
        _stop(proc)
        assert proc.exitcode == -signal.SIGKILL
        assert not store.exists(key) and store.get(key) is None
        art = store.get_or_create(key, build_payload(), wait_timeout=5, poll=0.05)
    finally:
        _stop(proc)
    assert not art.hit and sorted(art.manifest["files"]) == ["a.txt", "sub/zeros.bin"]
    store.gc()
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("backend", ["local", "file_uri"])
def test_frozen_builder_is_taken_over_after_stale_after(backend: str, tmp_path: Path) -> None:
    """A builder that is alive but stopped (SIGSTOP) stops heartbeating; once its last heartbeat is
    older than stale_after = 1 s its lock is broken and the waiter builds. It cannot happen sooner
    than 1 s minus one heartbeat interval (0.1 s) after the stop."""
    store = make(backend, tmp_path)
    key = store.key("eps", {"held": 1})
    proc = _start_holder(backend, tmp_path)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        art = store.get_or_create(key, build_payload(), wait_timeout=20, poll=0.05)
        waited = time.monotonic() - t0
    finally:
        _stop(proc)
    assert not art.hit and waited >= 0.9 - 0.1


def _foreign_lease(tmp_path: Path, store: ArtifactStore, key: ArtifactKey, *, pid_started: float) -> None:
    """A fresh lease on ``key`` recorded by "this process" (this pid and host, heartbeat now), with the
    process start time ``pid_started``."""
    owner = dataclasses.replace(_Owner.mine("f" * 16, time.time()), pid_started=pid_started)
    lease = tmp_path / "store" / ".locks" / key.stage / f"{key.digest}.lease"
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_bytes(owner.to_bytes())


def test_a_lease_of_a_reused_pid_is_taken_over_at_once(tmp_path: Path) -> None:
    """The lease names this pid on this host with a fresh heartbeat. Recorded with this process's start
    time, it is a live holder: the caller waits and times out. Recorded with a start time 1000 s
    earlier, it belonged to an earlier process that had the same pid: it is taken over at once. The
    store here never counts a lease stale by its heartbeat (stale_after one hour, longer than the
    wait), so only the pid check can let the second call build; the test asserts no wall-clock bound."""
    store = make("file_uri", tmp_path, heartbeat=1.0, stale_after=3600.0)
    live, reused = store.key("eps", {"lease": "live"}), store.key("eps", {"lease": "reused"})
    _foreign_lease(tmp_path, store, live, pid_started=start_time())
    with pytest.raises(ArtifactWaitTimeout, match=f"pid {os.getpid()}"):
        store.get_or_create(live, build_payload(), wait_timeout=0.2, poll=0.05)
    _foreign_lease(tmp_path, store, reused, pid_started=start_time() - 1000)
    art = store.get_or_create(reused, build_payload(), wait_timeout=60, poll=0.05)
    assert not art.hit and sorted(art.manifest["files"]) == ["a.txt", "sub/zeros.bin"]


def test_process_liveness_needs_the_same_pid_and_start_time() -> None:
    """This process is alive under its own start time, not under another (a reused pid); a child that
    ended is not alive, whether still a zombie (not yet waited for) or reaped; pids <= 0 never are."""
    assert alive(os.getpid()) and alive(os.getpid(), start_time())
    assert not alive(os.getpid(), start_time() - 1000)
    assert find_process(os.getpid(), start_time()) is not None
    assert find_process(os.getpid(), start_time() + 1000) is None
    child = mp.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    deadline = time.monotonic() + 10
    while alive(child.pid) and time.monotonic() < deadline:  # exited, not yet reaped: a zombie
        time.sleep(0.01)
    assert not alive(child.pid) and find_process(child.pid) is None
    child.join()
    assert not alive(child.pid)
    assert not alive(0) and not alive(-1) and find_process(0) is None


# --------------------------------------------------------------------------------------------------
# list, remove, gc, stats
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_remove_gc_and_stats(backend: str, tmp_path: Path) -> None:
    """eps/a holds 3 bytes, eps/b 5, rw/c 7 (+10 zeros each): eps = 2 artifacts, 3+10 + 5+10 = 28
    bytes; rw = 1 artifact, 7+10 = 17 bytes; 45 in all."""
    store = make(backend, tmp_path)
    keys = {}
    for name, stage, content in [("a", "eps", b"abc"), ("b", "eps", b"abcde"), ("c", "rw", b"abcdefg")]:
        keys[name] = store.key(stage, name)
        store.get_or_create(keys[name], build_payload(content))
    assert {str(i.key) for i in store.list()} == {str(k) for k in keys.values()}
    assert {i.key for i in store.list("eps")} == {keys["a"], keys["b"]}
    stats = store.stats()
    assert stats["by_stage"] == {"eps": {"artifacts": 2, "bytes": 28}, "rw": {"artifacts": 1, "bytes": 17}}
    assert (stats["artifacts"], stats["bytes"], stats["misses"]) == (3, 45, 3)

    dry = store.gc(lambda info: info.key.stage == "rw", dry_run=True)
    assert {i.key for i in dry.removed} == {keys["a"], keys["b"]} and dry.freed_bytes == 28
    assert len(store.list()) == 3
    assert store.gc(older_than=3600).removed == ()  # all were made just now
    assert store.gc().removed == ()  # no criterion: housekeeping only
    report = store.gc(lambda info: info.key.stage == "rw", older_than=0.0)
    assert {i.key for i in report.removed} == {keys["a"], keys["b"]}
    assert [i.key for i in store.list()] == [keys["c"]]
    assert store.remove(keys["c"]) and not store.remove(keys["c"])
    assert not store.exists(keys["c"]) and store.list() == []


def test_gc_cleans_temp_files_of_dead_builds_only(tmp_path: Path) -> None:
    """A build folder and an owner record's temp file left by a killed process are removed only
    when the key's lock is free (nobody builds it)."""
    store = make("local", tmp_path)
    key = store.key("eps", 8)
    leftover = tmp_path / "store" / "eps" / f".{key.digest}.dead.tmp"
    leftover.mkdir(parents=True)
    stray = tmp_path / "store" / ".locks" / "eps" / f".{key.digest}.lock.owner.dead.tmp"
    stray.parent.mkdir(parents=True)
    stray.write_text("{")
    holder = store._lock(key)
    assert holder.try_acquire()
    try:
        assert store.gc().cleaned == () and leftover.exists() and stray.exists()
    finally:
        holder.release()
    assert set(store.gc().cleaned) == {str(leftover), str(stray)}
    assert not leftover.exists() and not stray.exists()


@pytest.mark.parametrize("backend", ["local", "file_uri"])
def test_work_dir_survives_a_failed_build_and_goes_when_published(backend: str, tmp_path: Path) -> None:
    """A crashed build's checkpoint stays for the next build of the key to resume from; once the
    artifact is published the work folder is deleted."""
    store = make(backend, tmp_path)
    key = store.key("eps", 9)

    def crash(folder: Path) -> None:
        (store.work_dir(key) / "ckpt.txt").write_text("step 500")
        raise RuntimeError("killed at step 500")

    with pytest.raises(RuntimeError):
        store.get_or_create(key, crash)
    assert store.gc().cleaned == () and (store.work_dir(key) / "ckpt.txt").exists()  # kept: resumable
    resumed: list[str] = []

    def resume(folder: Path) -> None:
        resumed.append((store.work_dir(key) / "ckpt.txt").read_text())
        (folder / "model.pt").write_bytes(b"weights")

    store.get_or_create(key, resume)
    assert resumed == ["step 500"] and not store._work_path(key).exists()


def test_gc_removes_abandoned_work_folders_only_with_older_than(tmp_path: Path) -> None:
    store = make("local", tmp_path)
    key = store.key("eps", 10)
    work = store.work_dir(key)
    old = time.time() - 7200
    os.utime(work, (old, old))  # untouched for two hours
    assert store.gc().cleaned == () and work.exists()
    assert store.gc(older_than=3600).cleaned == (str(work),) and not work.exists()
