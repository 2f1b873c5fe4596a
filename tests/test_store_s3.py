"""The artifact store on a real S3 API: moto's S3 server, started in this process on 127.0.0.1.

Stores are opened through their URI, as a user writes it (``s3://bucket/prefix?endpoint_override=
127.0.0.1:PORT&scheme=http``), with fake credentials and region from the environment. Covered: the
conditional-write lease (claim with ``If-None-Match: *``, takeover / refresh / release with
``If-Match``), real processes racing for one build, a builder SIGKILLed mid-upload, a checksum
mismatch on the server, gc of dead leases and orphaned uploads, and the fallback to the portable
lease on a server that ignores the conditions.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from wsss_tune import artifacts
from wsss_tune.artifacts import MANIFEST_NAME, ArtifactKey, ArtifactStore, _Owner, _S3Conditional

REGION = "us-east-1"
#: Short timings: heartbeat every 0.1 s, dead after 1 s. No settle time: conditional claims need none.
FAST = {"heartbeat": 0.1, "stale_after": 1.0, "lease_settle": 0.0}
#: Processes racing on one core: a builder's heartbeat may be late by seconds, so it counts as
#: silent only after 10 s (the stale lease these tests start from is an hour old).
RACE = {"heartbeat": 0.5, "stale_after": 10.0, "lease_settle": 0.0}
#: Store prefix inside each test's bucket.
PREFIX = "artifacts"
#: SHA-256 of b"abc": the FIPS 180-2 test vector.
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@dataclasses.dataclass
class S3Store:
    """A store location on the test server: its URI, bucket and a boto3 client to look inside."""

    uri: str
    bucket: str
    endpoint: str
    client: Any

    def keys(self, under: str) -> list[str]:
        """Object keys below ``PREFIX/under`` (folder markers left out), relative to it."""
        base = f"{PREFIX}/{under}".rstrip("/") + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        return sorted(o["Key"][len(base):] for page in pages for o in page.get("Contents", [])
                      if not o["Key"].endswith("/"))

    def lease_key(self, key: ArtifactKey) -> str:
        return f"{PREFIX}/.locks/{key.stage}/{key.digest}.lease"


def _serialised(inner: Any) -> Any:
    """A WSGI app that serves one request at a time. moto checks a PutObject condition and stores the
    object in two steps without a lock, so two requests served at once could both pass the check; S3
    does both at once. Serialising keeps that guarantee; the clients still race to send requests."""
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with lock:
            return list(inner(environ, start_response))

    return app


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """``127.0.0.1:PORT`` of an S3 server (moto) running in a thread of this process."""
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    quiet = logging.getLogger("werkzeug")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    wsgi = server._server  # the werkzeug server; each request calls its current .app
    wsgi.app = _serialised(wsgi.app)
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()
        quiet.setLevel(level)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials and region for this test and the processes it starts; no AWS config files,
    profiles, endpoints, instance metadata or proxies are consulted."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def s3(aws_env: None, moto_endpoint: str) -> S3Store:
    """A fresh bucket on the test server and the URI of a store inside it."""
    import boto3

    bucket = f"wsss-test-{secrets.token_hex(6)}"
    client = boto3.session.Session().client("s3", endpoint_url=f"http://{moto_endpoint}", region_name=REGION)
    client.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/{PREFIX}?endpoint_override={moto_endpoint}&scheme=http"
    return S3Store(uri=uri, bucket=bucket, endpoint=moto_endpoint, client=client)


def make(s3: S3Store, tmp_path: Path, cache: str = "cache", **extra: Any) -> ArtifactStore:
    """A store on ``s3`` with its own local cache folder (another ``cache``: as if on another host)."""
    return ArtifactStore(uri=s3.uri, cache_dir=str(tmp_path / cache), **{**FAST, **extra})


def build_payload(content: bytes = b"abc", counter: list[int] | None = None) -> Any:
    def build(folder: Path) -> dict[str, Any]:
        if counter is not None:
            counter.append(1)
        (folder / "a.txt").write_bytes(content)
        (folder / "sub").mkdir()
        (folder / "sub" / "zeros.bin").write_bytes(bytes(10))
        return {"eps_miou": 0.66}

    return build


def _put_lease(s3: S3Store, key: ArtifactKey, owner: _Owner) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key=s3.lease_key(key), Body=owner.to_bytes())


def _foreign_owner(*, heartbeat_age: float) -> _Owner:
    """A lease record of a process on another host whose last heartbeat was ``heartbeat_age`` s ago."""
    t = time.time() - heartbeat_age
    return _Owner(token="f" * 16, pid=4242, host="another-host|boot|pidns", started=t, heartbeat=t)


# --------------------------------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------------------------------


def test_s3_uri_store_builds_once_with_conditional_claims(s3: S3Store, tmp_path: Path) -> None:
    """Through the URI: the server honours conditional writes, so claims use them. A build publishes
    a.txt (3 bytes, the FIPS sha256 vector), sub/zeros.bin and MANIFEST.json under the prefix; the
    lease is gone afterwards and no probe object is left. Another store (another cache) hits."""
    store = make(s3, tmp_path)
    assert store.is_remote and store.claim_mode == "conditional write"
    key = store.key("eps", {"tau": 0.4})
    calls: list[int] = []
    first = store.get_or_create(key, build_payload(counter=calls))
    assert not first.hit and len(calls) == 1
    assert first.manifest["files"]["a.txt"] == {"size": 3, "sha256": SHA256_ABC}
    assert s3.keys(f"eps/{key.digest}") == [MANIFEST_NAME, "a.txt", "sub/zeros.bin"]
    assert s3.keys(".locks") == []  # released, and the server probe cleaned up after itself

    other = make(s3, tmp_path, cache="cache_other")
    second = other.get_or_create(key, build_payload(counter=calls))
    assert second.hit and len(calls) == 1 and (second.path / "a.txt").read_bytes() == b"abc"
    assert [str(i.key) for i in other.list()] == [str(key)]


def test_explicit_s3_filesystem_carries_its_endpoint_and_keys(s3: S3Store, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``filesystem=S3FileSystem(...)`` with the endpoint and keys given to it, none in the
    environment: the claims reach the same server with the same keys."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint, scheme="http", access_key="testing",
                           secret_key="testing", region=REGION)
    store = ArtifactStore(uri=f"{s3.bucket}/{PREFIX}", filesystem=fs, cache_dir=str(tmp_path / "cache"), **FAST)
    assert store.claim_mode == "conditional write"
    art = store.get_or_create(store.key("eps", 1), build_payload())
    assert not art.hit and s3.keys(f"eps/{art.key.digest}") == [MANIFEST_NAME, "a.txt", "sub/zeros.bin"]


def test_missing_boto3_names_the_extra(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without boto3 an s3:// store fails at once, naming the store and the install command; a local
    store does not need it."""
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` raise ImportError
    uri = "s3://wsss-missing/artifacts?endpoint_override=127.0.0.1:9&scheme=http"
    with pytest.raises(ImportError, match=r"s3://wsss-missing.*pip install 'wsss-tune\[s3\]'"):
        ArtifactStore(uri=uri)
    assert ArtifactStore(uri="relative/store").claim_mode == "file lock"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_checksum_mismatch_on_the_server_is_detected_and_rebuilt(s3: S3Store, tmp_path: Path, damage: str) -> None:
    """a.txt = b"abc" is replaced on the server by b"abd" (same size: only SHA-256 tells) or b"ab"
    (2 bytes, manifest says 3). A store without a cached copy does not use it (``get`` is None),
    rebuilds it once and counts one repair naming a.txt; a third store then reads the good bytes."""
    store = make(s3, tmp_path)
    key = store.key("eps", 3)
    store.get_or_create(key, build_payload())
    s3.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}/eps/{key.digest}/a.txt",
                         Body=b"abd" if damage == "flip" else b"ab")

    fresh = make(s3, tmp_path, cache="cache_fresh")
    assert fresh.exists(key) and fresh.get(key) is None
    calls: list[int] = []
    art = fresh.get_or_create(key, build_payload(counter=calls))
    assert not art.hit and len(calls) == 1 and fresh.repairs == 1
    assert fresh.repaired[0][0] == str(key) and "a.txt" in fresh.repaired[0][1]
    third = make(s3, tmp_path, cache="cache_third").get(key)
    assert third is not None and (third / "a.txt").read_bytes() == b"abc"


def _pause_after_lease_reads(monkeypatch: pytest.MonkeyPatch, pause: Any) -> None:
    """Call ``pause(path)`` after every read of a lease record: a window between read and write."""
    real = _S3Conditional.read

    def read(self: _S3Conditional, path: str) -> Any:
        found = real(self, path)
        if path.endswith(".lease"):
            pause(path)
        return found

    monkeypatch.setattr(_S3Conditional, "read", read)


@pytest.mark.parametrize("start", ["free", "stale"])
def test_claims_racing_after_the_same_read_give_one_holder(s3: S3Store, tmp_path: Path, start: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Three claimants (threads, each its own lease) all read the lease, meet at a barrier, then
    write: with no lease (``If-None-Match: *``) or a stale one (old heartbeat, ``If-Match`` on the ETag
    read), exactly one gets it. An unconditional write would let all three believe they hold it."""
    store = make(s3, tmp_path)
    key = store.key("eps", {"race": start})
    if start == "stale":
        _put_lease(s3, key, _foreign_owner(heartbeat_age=3600))
    assert store.claim_mode == "conditional write"  # the probe runs before the pause is installed
    n = 3
    barrier = threading.Barrier(n, timeout=20)
    local = threading.local()

    def pause(path: str) -> None:
        if not getattr(local, "paused", False):  # only each claimant's first read
            local.paused = True
            barrier.wait()

    leases = [store._lock(key) for _ in range(n)]
    won: list[bool] = [False] * n

    def claim(i: int) -> None:
        won[i] = leases[i].try_acquire()

    with monkeypatch.context() as m:
        _pause_after_lease_reads(m, pause)
        threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert sum(won) == 1
    winner = leases[won.index(True)]
    assert (winner.previous is not None) == (start == "stale")
    holder = winner.holder()
    assert holder is not None and holder.pid == os.getpid() and holder.heartbeat > time.time() - 60
    winner.release()
    assert s3.keys(".locks") == []


def test_takeover_refresh_and_release_are_conditional(s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Leases here go stale 0.3 s after their last refresh (nothing refreshes them on its own).

    1. Holder A is silent too long; B reads A's stale record, but A refreshes before B writes: B's
       ``If-Match`` fails and A keeps the lease (it was slow, not dead).
    2. A is silent again and C takes over. A's next refresh fails and A logs that it lost the lease.
    3. C is silent and D takes over. C, unaware, releases: its conditional delete leaves D's lease.
    """
    store = make(s3, tmp_path, heartbeat=0.1, stale_after=0.3)
    key = store.key("eps", "slow")
    a, b, c, d = (store._lock(key) for _ in range(4))

    def token(lease: Any) -> str | None:
        owner = lease.holder()
        return None if owner is None else owner.token

    assert a.try_acquire()
    time.sleep(0.5)
    with monkeypatch.context() as m:
        _pause_after_lease_reads(m, lambda path: a.refresh())  # A wakes up between B's read and write
        assert not b.try_acquire()
    assert token(a) == a._token

    time.sleep(0.5)
    assert c.try_acquire() and c.previous is not None and c.previous.token == a._token
    with caplog.at_level(logging.WARNING, logger="wsss_tune.artifacts"):
        a.refresh()
    assert "lost the lease" in caplog.text and token(a) == c._token

    time.sleep(0.5)
    assert d.try_acquire() and d.previous is not None and d.previous.token == c._token
    c.release()
    assert token(d) == d._token
    d.release()
    assert token(d) is None and s3.keys(".locks") == []


def test_gc_removes_dead_leases_and_orphaned_uploads_only(s3: S3Store, tmp_path: Path) -> None:
    """A lease whose holder went silent an hour ago and an upload without a manifest (nobody building
    it) are removed; a lease with a fresh heartbeat and its key's upload folder stay."""
    store = make(s3, tmp_path, heartbeat=1.0, stale_after=60.0)
    dead, live, orphan = store.key("eps", "dead"), store.key("eps", "live"), store.key("eps", "orphan")
    _put_lease(s3, dead, _foreign_owner(heartbeat_age=3600))
    _put_lease(s3, live, _foreign_owner(heartbeat_age=1))
    for k in (orphan, live):
        s3.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}/eps/{k.digest}/part.bin", Body=b"half")
    report = store.gc()
    assert report.removed == ()
    cleaned = {c.rsplit("/", 1)[-1] for c in report.cleaned}
    assert cleaned == {f"{dead.digest}.lease", orphan.digest}
    assert s3.keys(".locks") == [f"eps/{live.digest}.lease"]
    assert s3.keys("eps") == [f"{live.digest}/part.bin"]


@pytest.mark.parametrize("ignored", ["all", "delete"])
def test_a_server_that_ignores_conditions_is_detected(s3: S3Store, tmp_path: Path, ignored: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A server that drops ``If-None-Match`` / ``If-Match`` (simulated by removing the headers before
    they are sent) would let every claimant win, so the store falls back to the portable lease and
    says so; one that only ignores conditional deletes keeps conditional claims. Builds work in both."""
    store = make(s3, tmp_path, lease_settle=0.05)
    assert store._s3 is not None
    drop = ("If-None-Match", "If-Match") if ignored == "all" else ("If-Match",)
    operations = ("PutObject", "DeleteObject") if ignored == "all" else ("DeleteObject",)

    def strip(request: Any, **_: Any) -> None:
        for header in drop:
            del request.headers[header]  # no error when absent

    for op in operations:
        store._s3.client.meta.events.register(f"before-sign.s3.{op}", strip)
    with caplog.at_level(logging.WARNING, logger="wsss_tune.artifacts"):
        mode = store.claim_mode
    if ignored == "all":
        assert mode == "settle" and "If-None-Match on PutObject" in caplog.text and "portable lease" in caplog.text
    else:
        assert mode == "conditional write" and "If-Match on DeleteObject" in caplog.text
    art = store.get_or_create(store.key("eps", ignored), build_payload())
    assert not art.hit and s3.keys(".locks") == []


# --------------------------------------------------------------------------------------------------
# several processes
# --------------------------------------------------------------------------------------------------


def _race_worker(uri: str, cache: str, counter: str, read_pause: float, barrier: Any, results: Any) -> None:
    """One process of the race: open the store, meet the others, ask for the artifact."""
    store = ArtifactStore(uri=uri, cache_dir=cache, **RACE)
    assert store.claim_mode == "conditional write"  # probe the server before the race
    key = store.key("eps", {"shared": True})
    if read_pause:  # every process reads the lease before any writes
        real, paused = _S3Conditional.read, []

        def read(self: _S3Conditional, path: str) -> Any:
            found = real(self, path)
            if path.endswith(".lease") and not paused:
                paused.append(True)
                time.sleep(read_pause)
            return found

        _S3Conditional.read = read  # type: ignore[method-assign]

    def build(folder: Path) -> dict[str, Any]:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the others arrive while this one builds
        (folder / "payload.bin").write_bytes(f"built by {os.getpid()}".encode())
        return {"builder": os.getpid()}

    barrier.wait()
    art = store.get_or_create(key, build, poll=0.05, wait_timeout=60)
    results.put((art.hit, (art.path / "payload.bin").read_bytes()))


@pytest.mark.parametrize(("start", "read_pause"), [("free", 0.0), ("free", 0.5), ("stale", 0.5)])
def test_processes_claiming_at_once_build_once(s3: S3Store, tmp_path: Path, start: str, read_pause: float) -> None:
    """3 spawned processes, each with its own cache (as on 3 hosts), ask for one artifact at the same
    moment: the build runs once (one line in the marker file), one process reports a miss and two a
    hit, all read the same bytes, and the lease is gone afterwards. ``read_pause`` holds every process
    for 0.5 s after it reads the lease, so all of them decide on the same record before anyone writes;
    ``stale`` starts from a lease whose holder went silent an hour ago, so all of them take it over
    at once and the ``If-Match`` write must pick one."""
    n = 3
    key = make(s3, tmp_path).key("eps", {"shared": True})
    if start == "stale":
        _put_lease(s3, key, _foreign_owner(heartbeat_age=3600))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n, timeout=60), ctx.Queue()
    counter = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_race_worker, args=(s3.uri, str(tmp_path / f"cache{i}"), str(counter), read_pause,
                                                    barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=90) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0] * n
    assert len(counter.read_text().splitlines()) == 1
    assert sorted(hit for hit, _ in got) == [False] + [True] * (n - 1)
    assert len({payload for _, payload in got}) == 1
    assert s3.keys(".locks") == []


class _HangingOutput:
    """An output stream that writes half of the first block it gets, says so in ``marker``, and hangs."""

    def __init__(self, inner: Any, marker: str) -> None:
        self._inner, self._marker = inner, marker

    def __enter__(self) -> _HangingOutput:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)

    def write(self, block: bytes) -> None:
        self._inner.write(block[: len(block) // 2])
        Path(self._marker).write_text("uploading")
        time.sleep(600)


class _HangingFS:
    """A pyarrow filesystem that hangs while uploading a file named ``big.bin`` (everything else passes)."""

    def __init__(self, inner: pafs.FileSystem, marker: str) -> None:
        self._inner, self._marker = inner, marker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_output_stream(self, path: str, *args: Any, **kwargs: Any) -> Any:
        out = self._inner.open_output_stream(path, *args, **kwargs)
        return _HangingOutput(out, self._marker) if path.endswith("/big.bin") else out


def _upload_until_killed(uri: str, cache: str, marker: str, where: str) -> None:
    """Build eps/{"killed": 1} and hang in its upload: in the middle of big.bin (``data``) or after
    every file but before the manifest (``manifest``)."""
    store = ArtifactStore(uri=uri, cache_dir=cache, heartbeat=1.0, stale_after=3600.0)
    if where == "data":
        store._fs = _HangingFS(store._fs, marker)
    else:
        real = artifacts._write_remote

        def hang(fs: Any, path: str, blob: bytes, *, tmp: str) -> None:
            if path.endswith(MANIFEST_NAME):
                Path(marker).write_text("uploaded all but the manifest")
                time.sleep(600)
            real(fs, path, blob, tmp=tmp)

        artifacts._write_remote = hang

    def build(folder: Path) -> None:
        (folder / "a.txt").write_bytes(b"partial build")
        (folder / "big.bin").write_bytes(b"\1" * 65536)

    store.get_or_create(store.key("eps", {"killed": 1}), build)


@pytest.mark.parametrize("where", ["data", "manifest"])
def test_builder_killed_mid_upload_leaves_nothing_readable(s3: S3Store, tmp_path: Path, where: str) -> None:
    """A spawned builder is SIGKILLed while uploading (half-way through big.bin, or with every file
    up but the manifest): the server then holds part of the artifact and the dead builder's lease.
    Another store sees no artifact (not published, nothing listed, ``get`` None), takes the lease of
    the dead process over at once (stale_after is an hour: only the liveness check allows it),
    rebuilds, and the published folder holds the new files only."""
    marker = tmp_path / "uploading.txt"
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_upload_until_killed, args=(s3.uri, str(tmp_path / "cache_killed"), str(marker), where))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.is_alive(), f"builder exited early with {proc.exitcode}"
            assert time.monotonic() < deadline, "builder never reached its upload"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL

    store = make(s3, tmp_path, heartbeat=1.0, stale_after=3600.0)
    key = store.key("eps", {"killed": 1})
    left = s3.keys(f"eps/{key.digest}")
    assert "a.txt" in left and MANIFEST_NAME not in left  # part of the artifact is on the server
    assert s3.keys(".locks") == [f"eps/{key.digest}.lease"]  # and the dead builder's lease
    assert not store.exists(key) and store.get(key) is None and store.list() == []

    art = store.get_or_create(key, build_payload(), wait_timeout=30, poll=0.05)
    assert not art.hit and sorted(art.manifest["files"]) == ["a.txt", "sub/zeros.bin"]
    assert s3.keys(f"eps/{key.digest}") == [MANIFEST_NAME, "a.txt", "sub/zeros.bin"]
    assert s3.keys(".locks") == []
    fresh = make(s3, tmp_path, cache="cache_fresh").get(key)
    assert fresh is not None and (fresh / "a.txt").read_bytes() == b"abc"
