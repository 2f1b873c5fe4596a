"""Content-addressed store for stage outputs (checkpoints, CAMs, affinities, masks).

An artifact is a folder of files keyed by its stage and a hash of everything upstream that produced
it (:func:`wsss_tune.config.config_hash`), so trials that share an upstream configuration share its
output instead of recomputing it. The store lives on a local path or on any pyarrow filesystem URI
(``file://``, ``s3://``, ``gs://`` ...), so the processes of a Ray cluster can share one.

Guarantees:

* **Built once.** Processes that need the same missing artifact agree through a lock: one builds,
  the others wait and then read its result. Local stores use an OS file lock (``filelock``), which
  the kernel drops when its holder dies; remote stores use a lease file with the owner's pid, its
  start time, host and a heartbeat. A holder whose heartbeat is older than ``stale_after`` (frozen,
  or its host is gone), or whose process no longer runs on this host (same pid and start time:
  :func:`wsss_tune.utils.procs.alive`), is taken over.
* **Leases without a timing assumption on S3.** An ``s3://`` store claims a lease with a conditional
  write (PutObject with ``If-None-Match: *``: of concurrent claimants exactly one succeeds) and takes
  a stale one over, refreshes and releases it with ``If-Match`` on the ETag it read, so two processes
  never both believe they hold it (:class:`_S3Lease`; boto3 sends these headers, pyarrow cannot). A
  store first checks that its server honours the conditions; a server that ignores them, and every
  other remote filesystem, gets the portable lease (:class:`_Lease`): write a claim, wait
  ``lease_settle`` seconds, read it back, which holds only while one small write takes less time.
* **Published atomically.** A build writes into a private temporary folder. Locally the folder is
  renamed into place; remotely its files are uploaded and ``MANIFEST.json`` is written last.
  Readers trust only a folder with a manifest, so a crash mid-build leaves nothing trusted.
* **Verified on read.** The manifest lists every file's size and SHA-256; :meth:`ArtifactStore.get`
  checks them, and a truncated or altered artifact counts as missing (and is rebuilt by
  :meth:`ArtifactStore.get_or_create`) instead of being used. Each rebuild of a corrupted artifact
  is counted in :attr:`ArtifactStore.repairs` (a trial reports it as ``cache_repairs``).

Layout under the store root::

    <stage>/<digest>/MANIFEST.json      published artifact (plus its files)
    .locks/<stage>/<digest>.lock        local OS lock (+ ``.owner`` record) / ``.lease`` remotely
    .work/<stage>/<digest>/             resumable scratch of a build (:meth:`ArtifactStore.work_dir`)
    .trash/                             local folders being deleted

For a remote store, :meth:`ArtifactStore.get` returns a verified copy in a local cache folder.
Use ``file://`` for a folder that several hosts mount (NFS): leases do not depend on the network
filesystem honouring OS locks across hosts.

The store knows nothing of Ray; a trial simply constructs one from the URI in its config.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import filelock
import pyarrow.fs as pafs

from wsss_tune.config import config_hash, to_dict
from wsss_tune.utils.io import atomic_dir, atomic_write_bytes, file_sha256
from wsss_tune.utils.procs import alive, start_time

__all__ = [
    "MANIFEST_NAME",
    "ArtifactError",
    "ArtifactWaitTimeout",
    "ArtifactKey",
    "Artifact",
    "ArtifactInfo",
    "GcReport",
    "ArtifactStore",
]

log = logging.getLogger(__name__)

#: Marks a published artifact; readers trust only folders that have one. Written last.
MANIFEST_NAME = "MANIFEST.json"
#: Version of the manifest layout; bump when a field changes meaning.
MANIFEST_FORMAT = 1
#: Block size for hashing and copying: large enough for throughput, small enough for memory.
_CHUNK = 8 * 1024 * 1024
#: Stage names become folder names; a leading dot is reserved for the store's own folders.
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
#: Digests are lowercase hex (``config_hash`` output).
_DIGEST_RE = re.compile(r"^[0-9a-f]+$")
#: A SHA-256 digest in hex: 64 lowercase characters.
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: A builder refreshes its owner record this often (seconds).
DEFAULT_HEARTBEAT = 10.0
#: A holder silent this long is taken over: twelve missed heartbeats, enough to ride out a long
#: pause of a busy host or a slow network filesystem, short enough that a crashed builder on
#: another host costs minutes, not hours.
DEFAULT_STALE_AFTER = 120.0
#: Remote leases without conditional writes wait this long between writing a claim and reading it
#: back; it must exceed the time between another claimant's read and its write (one small object
#: write, well under a second on S3/GCS), so that both see the later claim.
DEFAULT_LEASE_SETTLE = 0.5
#: What installs boto3, which ``s3://`` stores need for their conditional-write leases.
S3_EXTRA_HINT = "pip install 'wsss-tune[s3]'"
#: HTTP statuses of a conditional S3 request whose condition did not hold: 412 Precondition Failed,
#: and 409 ConditionalRequestConflict (another conditional write to the same object was in flight).
#: ``If-Match`` on an object that is gone also fails, with 404.
_S3_LOST = (409, 412)
#: Waiters look for the published artifact (and retry the lock) this often (seconds).
DEFAULT_POLL = 0.5
_LOCKS = ".locks"
_TRASH = ".trash"
_WORK = ".work"


class ArtifactError(RuntimeError):
    """A build produced something that cannot be published (the message names the artifact)."""


class ArtifactWaitTimeout(TimeoutError):
    """Waiting for another process to build an artifact took longer than ``wait_timeout``."""


class _Corrupt(Exception):
    """Internal: a published artifact failed verification."""


# --------------------------------------------------------------------------------------------------
# Keys, artifacts, listings
# --------------------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """JSON-plain form of a key part (configs become dicts); reject values without a stable form."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__, **to_dict(value)}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"artifact key part {where}: mapping key {k!r} is not a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise TypeError(f"artifact key part {where}: {type(value).__name__} has no stable text form; "
                    "pass config dataclasses or plain values (str, number, bool, None, list, dict, path)")


@dataclass(frozen=True)
class ArtifactKey:
    """Identity of an artifact: ``stage`` plus a hash of everything upstream (``str()`` = ``stage/digest``).

    ``parts`` (the JSON-plain upstream values) is recorded in the manifest; it takes no part in
    equality, so a key parsed back from text equals the one it was made from.
    """

    stage: str
    digest: str
    parts: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not _STAGE_RE.match(self.stage):
            raise ValueError(f"artifact stage {self.stage!r}: expected letters, digits, '_' or '-', "
                             "not starting with '_' or '-'")
        if not isinstance(self.digest, str) or not _DIGEST_RE.match(self.digest):
            raise ValueError(f"artifact digest {self.digest!r}: expected lowercase hex")

    def __str__(self) -> str:
        return f"{self.stage}/{self.digest}"

    @classmethod
    def parse(cls, text: str) -> ArtifactKey:
        """Key from its text form ``stage/digest`` (e.g. from ``wsss-tune cache ls``)."""
        stage, sep, digest = text.strip().partition("/")
        if not sep:
            raise ValueError(f"artifact key {text!r}: expected 'stage/digest'")
        return cls(stage=stage, digest=digest)


@dataclass(frozen=True)
class Artifact:
    """A published, verified artifact as seen by one caller.

    ``hit`` is True when the artifact already existed (or another process built it while this one
    waited) and False when this call built it.
    """

    key: ArtifactKey
    path: Path
    manifest: Mapping[str, Any]
    hit: bool

    @property
    def metadata(self) -> dict[str, Any]:
        """The dict the build function returned (e.g. its metrics)."""
        return dict(self.manifest.get("metadata", {}))

    @property
    def build_seconds(self) -> float:
        """Seconds the build took when the artifact was made."""
        return float(self.manifest.get("build_seconds", 0.0))


@dataclass(frozen=True)
class ArtifactInfo:
    """One row of :meth:`ArtifactStore.list` (read from the manifest, not verified)."""

    key: ArtifactKey
    created: float
    size_bytes: int
    num_files: int
    build_seconds: float
    metadata: Mapping[str, Any]
    location: str

    @property
    def age_seconds(self) -> float:
        return time.time() - self.created


@dataclass(frozen=True)
class GcReport:
    """What :meth:`ArtifactStore.gc` removed (or would remove, with ``dry_run``)."""

    removed: tuple[ArtifactInfo, ...]
    freed_bytes: int
    #: Leftovers of crashed builds, stale locks and orphaned uploads that were cleaned up.
    cleaned: tuple[str, ...]
    dry_run: bool


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------


def _scan(folder: Path, key: ArtifactKey) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder`` by POSIX relative path."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise ArtifactError(f"artifact {key}: the build left a symlink {name!r} in {dirpath}; "
                                    "artifacts must hold regular files (copy the target instead)")
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(folder).as_posix()
            if rel == MANIFEST_NAME:
                raise ArtifactError(f"artifact {key}: the build wrote {MANIFEST_NAME}, a name the store reserves")
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return dict(sorted(files.items()))


def _dump(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _parse_manifest(blob: bytes, key: ArtifactKey) -> dict[str, Any]:
    """Decode and sanity-check a manifest; raise :class:`_Corrupt` saying what is wrong."""
    try:
        manifest = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Corrupt(f"{MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _Corrupt(f"{MANIFEST_NAME} is not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise _Corrupt(f"{MANIFEST_NAME} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    if manifest.get("key") != str(key):
        raise _Corrupt(f"{MANIFEST_NAME} names key {manifest.get('key')!r}, expected {str(key)!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _Corrupt(f"{MANIFEST_NAME} has no 'files' mapping")
    for rel, meta in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or rel == MANIFEST_NAME:
            raise _Corrupt(f"{MANIFEST_NAME} lists an unsafe path {rel!r}")
        if (not isinstance(meta, dict) or not isinstance(meta.get("size"), int)
                or not isinstance(meta.get("sha256"), str) or not _SHA256_RE.match(meta["sha256"])):
            raise _Corrupt(f"{MANIFEST_NAME} entry for {rel!r} needs an integer size and a sha256")
    return manifest


def _verify_dir(folder: Path, manifest: Mapping[str, Any], mode: str) -> list[str]:
    """Problems with ``folder``'s files against ``manifest`` (empty when it verifies)."""
    problems = []
    for rel, meta in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != meta["size"]:
            problems.append(f"{rel}: {size} bytes, manifest says {meta['size']}")
        elif mode == "sha256" and file_sha256(path) != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def _check_metadata(value: Any, key: ArtifactKey) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"build for artifact {key} returned {type(value).__name__}; "
                        "expected a dict of metadata (e.g. metrics) or None")
    try:
        json.dumps(dict(value), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"build for artifact {key} returned metadata that is not JSON-serialisable ({exc})") from None
    return dict(value)


# --------------------------------------------------------------------------------------------------
# Owners, locks and leases
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _host_id() -> str:
    """This machine and pid namespace: pids are comparable only between processes with equal ids."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def _read_remote(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of the file ``path`` on ``fs``, or None if there is none."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_remote(fs: pafs.FileSystem, path: str, blob: bytes, *, tmp: str) -> None:
    """Write ``blob`` to ``tmp`` on ``fs``, then move it to ``path``: readers never see half a file."""
    with fs.open_output_stream(tmp) as f:
        f.write(blob)
    fs.move(tmp, path)


@dataclass(frozen=True)
class _Owner:
    """Who holds a lock or lease, and when it last said it was alive.

    ``started`` is when it took the lock; ``pid_started`` its process's start time, so that a later
    process that got the same pid is not taken for the holder (None in records written without it).
    """

    token: str
    pid: int
    host: str
    started: float
    heartbeat: float
    pid_started: float | None = None

    @classmethod
    def mine(cls, token: str, started: float) -> _Owner:
        return cls(token=token, pid=os.getpid(), host=_host_id(), started=started, heartbeat=time.time(),
                   pid_started=start_time())

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode("utf-8")

    @classmethod
    def from_bytes(cls, blob: bytes) -> _Owner | None:
        try:
            d = json.loads(blob)
            pid_started = d.get("pid_started")
            return cls(token=str(d["token"]), pid=int(d["pid"]), host=str(d["host"]),
                       started=float(d["started"]), heartbeat=float(d["heartbeat"]),
                       pid_started=None if pid_started is None else float(pid_started))
        except (ValueError, KeyError, TypeError):
            return None

    def dead(self) -> bool:
        """Known dead: it ran on this host and its process no longer runs."""
        return self.host == _host_id() and not alive(self.pid, self.pid_started)

    def stale(self, now: float, stale_after: float) -> bool:
        """Known dead, or silent for longer than ``stale_after`` seconds: its lock may be taken over."""
        return self.dead() or now - self.heartbeat > stale_after

    def describe(self, now: float) -> str:
        host = self.host.split("|", 1)[0]
        return f"pid {self.pid} on {host} (last heartbeat {now - self.heartbeat:.1f}s ago)"


class _Lock(Protocol):
    previous: _Owner | None

    def try_acquire(self) -> bool: ...
    def refresh(self) -> None: ...
    def release(self) -> None: ...
    def holder(self) -> _Owner | None: ...
    def break_if_stale(self) -> _Owner | None: ...


class _LocalLock:
    """``filelock`` lock plus an owner record (pid, host, heartbeat) beside it.

    The kernel drops the lock when its holder dies, so a killed builder needs no breaking; only a
    holder that is alive but silent for ``stale_after`` seconds (frozen) is broken, by unlinking
    the lock file so that the next acquirer locks a fresh one.
    """

    def __init__(self, *, path: Path, stale_after: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.owner_path = path.with_name(path.name + ".owner")
        self.stale_after = stale_after
        self.previous: _Owner | None = None
        self._lock = filelock.FileLock(str(path), thread_local=False)
        self._token = secrets.token_hex(8)
        self._started = 0.0

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            return False
        self.previous = self.holder()
        self._started = time.time()
        self.refresh()
        return True

    def refresh(self) -> None:
        atomic_write_bytes(self.owner_path, _Owner.mine(self._token, self._started).to_bytes())

    def release(self) -> None:
        owner = self.holder()
        if owner is not None and owner.token == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.owner_path.unlink()
        self._lock.release()

    def discard(self) -> None:
        """Unlink the lock file and owner record; the next acquirer locks a fresh file."""
        for p in (self.path, self.owner_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def holder(self) -> _Owner | None:
        try:
            return _Owner.from_bytes(self.owner_path.read_bytes())
        except OSError:
            return None

    def break_if_stale(self) -> _Owner | None:
        owner, now = self.holder(), time.time()
        # A dead holder on this host already lost its OS lock: nothing to break.
        if owner is None or owner.dead() or now - owner.heartbeat <= self.stale_after:
            return None
        log.warning("breaking the lock %s held by %s: silent for longer than %.0fs",
                    self.path, owner.describe(now), self.stale_after)
        self.discard()
        return owner


class _Lease:
    """Lease file on a pyarrow filesystem: write our record, wait ``settle`` seconds, read it back.

    If two processes claim at once, the later write wins and the earlier one sees a foreign token
    and backs off. A lease whose holder died on this host, or whose heartbeat is older than
    ``stale_after``, is overwritten. Each write goes to a temporary name and is moved into place,
    so readers never see half a record.
    """

    def __init__(self, *, fs: pafs.FileSystem, path: str, stale_after: float, settle: float) -> None:
        self.fs = fs
        self.path = path
        self.stale_after = stale_after
        self.settle = settle
        self.previous: _Owner | None = None
        self._token = secrets.token_hex(8)
        self._started = 0.0

    def _write(self) -> None:
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        _write_remote(self.fs, self.path, _Owner.mine(self._token, self._started).to_bytes(),
                      tmp=f"{self.path}.{self._token}.tmp")

    def holder(self) -> _Owner | None:
        return _lease_holder(self.fs, self.path)

    def try_acquire(self) -> bool:
        current, now = self.holder(), time.time()
        if current is not None and current.token != self._token:
            if not current.stale(now, self.stale_after):
                return False
            log.warning("taking over the lease %s from %s", self.path, current.describe(now))
        self.previous = current
        self._started = now
        self._write()
        time.sleep(self.settle)
        current = self.holder()
        return current is not None and current.token == self._token

    def refresh(self) -> None:
        current = self.holder()
        if current is None or current.token != self._token:
            log.warning("lost the lease %s to %s; finishing the build anyway", self.path,
                        current.describe(time.time()) if current else "nobody")
            return
        self._write()

    def release(self) -> None:
        current = self.holder()
        if current is not None and current.token == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self.path)

    def break_if_stale(self) -> _Owner | None:
        return None  # try_acquire takes over stale leases itself

    def discard_if_stale(self, now: float) -> bool:
        """Delete the lease if its holder is stale (for ``gc``); True if it was deleted."""
        owner = self.holder()
        if owner is None or not owner.stale(now, self.stale_after):
            return False
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path)
        return True


def _owner_or_age(blob: bytes, mtime: float) -> _Owner:
    """The owner in a lease record; an unreadable record is judged by its age (``mtime``)."""
    owner = _Owner.from_bytes(blob)
    if owner is None:
        owner = _Owner(token="?", pid=-1, host="?", started=mtime, heartbeat=mtime)
    return owner


def _lease_holder(fs: pafs.FileSystem, path: str) -> _Owner | None:
    """The owner recorded in the lease file ``path``; an unreadable record is judged by the file's age."""
    blob = _read_remote(fs, path)
    if blob is None:
        return None
    owner = _Owner.from_bytes(blob)
    if owner is None:
        info = fs.get_file_info(path)
        owner = _owner_or_age(blob, info.mtime.timestamp() if info.mtime is not None else 0.0)
    return owner


def _s3_options(fs: pafs.FileSystem) -> dict[str, Any] | None:
    """The options a pyarrow ``S3FileSystem`` was made with (endpoint, region, credentials ...), read
    from its pickling recipe (how Ray ships it to workers); None if this pyarrow does not give them."""
    try:
        args = fs.__reduce__()[1]
        opts = args[0] if len(args) == 1 else None
    except (TypeError, IndexError, AttributeError):
        return None
    return dict(opts) if isinstance(opts, Mapping) else None


class _S3Conditional:
    """Conditional writes and deletes of small objects on the S3 server of a pyarrow ``S3FileSystem``.

    pyarrow cannot send ``If-None-Match`` / ``If-Match``, so these go through a boto3 client set up
    like the filesystem: its endpoint, scheme, region, proxy and CA file, and its access key if it was
    given one (else boto3 finds credentials the usual way: ``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE`` /
    instance roles). Paths are pyarrow's ``bucket/key``. The client is made on first use and is not
    pickled.
    """

    def __init__(self, client_kwargs: dict[str, Any], where: str) -> None:
        self._kwargs = client_kwargs
        self.where = where
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @classmethod
    def for_filesystem(cls, fs: pafs.FileSystem, uri: str) -> _S3Conditional | None:
        """The writer for ``fs``; None (with a warning saying why) when ``fs``'s options cannot be
        read or need a credential source this client is not given (an assumed role)."""
        try:
            import boto3  # noqa: F401  (imported here: only s3:// stores need it)
            from botocore.config import Config
        except ImportError:
            raise ImportError(f"artifact store {uri!r}: an s3:// store claims its builds with S3 conditional "
                              f"writes, which need boto3; install it with: {S3_EXTRA_HINT}") from None
        opts = _s3_options(fs)
        if opts is None or opts.get("role_arn"):
            why = "assumes a role (role_arn)" if opts else "does not expose its options"
            log.warning("artifact store %s: the S3 filesystem %s, so builds are claimed with the portable "
                        "lease (write, wait lease_settle seconds, read back) instead of conditional writes", uri, why)
            return None
        scheme = opts.get("scheme") or "https"
        endpoint = opts.get("endpoint_override") or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{scheme}://{endpoint}"
        config: dict[str, Any] = {
            "retries": {"mode": "standard", "max_attempts": 5},
            "s3": {"addressing_style": "virtual" if opts.get("force_virtual_addressing")
                   else "path" if endpoint else "auto"},
            # Lease records are tiny; checksum trailers only trouble older S3-compatible servers.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        for ours, theirs in (("connect_timeout", "connect_timeout"), ("read_timeout", "request_timeout")):
            if (opts.get(theirs) or -1) > 0:
                config[ours] = float(opts[theirs])
        proxy = opts.get("proxy_options") or {}
        if isinstance(proxy, Mapping) and proxy.get("host"):
            auth = f"{proxy['username']}:{proxy.get('password', '')}@" if proxy.get("username") else ""
            port = f":{proxy['port']}" if (proxy.get("port") or -1) > 0 else ""
            url = f"{proxy.get('scheme') or 'http'}://{auth}{proxy['host']}{port}"
            config["proxies"] = {"http": url, "https": url}
        kwargs: dict[str, Any] = {"endpoint_url": endpoint, "region_name": opts.get("region") or None}
        if opts.get("anonymous"):
            from botocore import UNSIGNED

            config["signature_version"] = UNSIGNED
        elif opts.get("access_key"):
            kwargs.update(aws_access_key_id=opts["access_key"], aws_secret_access_key=opts.get("secret_key"),
                          aws_session_token=opts.get("session_token") or None)
        if opts.get("tls_ca_file_path"):
            kwargs["verify"] = opts["tls_ca_file_path"]
        kwargs["config"] = Config(**config)
        return cls(kwargs, where=endpoint or "AWS S3")

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client("s3", **self._kwargs)
        return self._client

    @staticmethod
    def _split(path: str) -> dict[str, str]:
        bucket, _, key = path.partition("/")
        return {"Bucket": bucket, "Key": key}

    @staticmethod
    def _status(exc: Exception) -> int | None:
        response = getattr(exc, "response", None)
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None

    def read(self, path: str) -> tuple[bytes, str, float] | None:
        """``(bytes, ETag, mtime)`` of the object ``path``, or None if there is none."""
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(**self._split(path))
        except ClientError as exc:
            if self._status(exc) == 404:
                return None
            raise
        with contextlib.closing(reply["Body"]) as body:
            blob = body.read()
        return blob, reply["ETag"], reply["LastModified"].timestamp()

    def put(self, path: str, blob: bytes, *, if_match: str | None = None) -> str | None:
        """Write ``blob`` to ``path`` if no object is there (``if_match`` None) or the one there has the
        ETag ``if_match``; the new ETag, or None when the condition did not hold."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": if_match}
        try:
            return str(self.client.put_object(Body=blob, **self._split(path), **condition)["ETag"])
        except ClientError as exc:
            status = self._status(exc)
            if status in _S3_LOST or (if_match is not None and status == 404):
                return None
            raise

    def delete(self, path: str, if_match: str | None) -> bool:
        """Delete ``path`` if its ETag is ``if_match`` (always, with None); False when the condition did
        not hold or the object is gone."""
        from botocore.exceptions import ClientError

        condition = {} if if_match is None else {"IfMatch": if_match}
        try:
            self.client.delete_object(**self._split(path), **condition)
        except ClientError as exc:
            if self._status(exc) in (*_S3_LOST, 404):
                return False
            raise
        return True

    def ignored_conditions(self, folder: str) -> builtins.list[str]:
        """The conditions this server ignores or refuses (empty: all honoured), found by conditional
        writes to a new probe object under ``folder`` that must fail, then deleting it."""
        from botocore.exceptions import BotoCoreError, ClientError

        path = posixpath.join(folder, f".probe.{secrets.token_hex(6)}.tmp")
        ignored: builtins.list[str] = []
        try:
            created = self.put(path, b"probe")
        except (ClientError, BotoCoreError) as exc:
            raise OSError(f"S3 server {self.where}: cannot write the probe object {path} ({exc}); expected a "
                          "bucket these credentials may write (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                          "AWS_PROFILE) at that endpoint") from exc
        if created is None:
            raise OSError(f"S3 server {self.where}: creating the new object {path} with If-None-Match failed; "
                          "expected it to succeed (nothing else writes that name)")
        # Each attempt's condition does not hold, so each must be refused; True means it happened.
        checks: tuple[tuple[str, Callable[[], bool]], ...] = (
            ("If-None-Match on PutObject", lambda: self.put(path, b"again") is not None),
            ("If-Match on PutObject", lambda: self.put(path, b"again", if_match='"0"') is not None),
            ("If-Match on DeleteObject", lambda: self.delete(path, '"0"')),
        )
        try:
            for name, attempt in checks:
                try:
                    if attempt():
                        ignored.append(name)
                except (ClientError, BotoCoreError) as exc:  # e.g. 501 Not Implemented, or an older
                    ignored.append(f"{name} ({exc})")     # botocore without the parameter: not usable
        finally:
            self.delete(path, None)
        return ignored


class _S3Lease:
    """Lease object on S3 claimed with conditional writes: no step depends on timing.

    * **Claim**: PutObject with ``If-None-Match: *`` creates the lease only if there is none; of
      claimants racing for a free lease, S3 lets exactly one succeed (the others get 412 or 409).
    * **Takeover**: a stale lease (its holder dead on this host, or its heartbeat older than
      ``stale_after``) is overwritten with ``If-Match: <the ETag read>``: of the processes that judged
      the same record stale exactly one succeeds, and if the holder refreshed in between (it was only
      slow), the ETag changed and nobody takes it.
    * **Refresh** overwrites with ``If-Match`` on our own last ETag, so a holder that was taken over
      learns it (and stops refreshing) instead of silently reclaiming the lease.
    * **Release** (and ``gc`` of a stale lease) deletes with ``If-Match``, so it never removes a
      successor's lease. Where the server ignores conditional deletes (the store checks on first use)
      it reads the ETag and then deletes: a holder that was frozen past ``stale_after`` and taken over
      between that read and the delete could remove its successor's lease.

    A retried request whose first attempt landed gets 412 on the retry; the lease then reads the
    record back and counts it as held when it carries this lease's token.
    """

    def __init__(self, *, s3: _S3Conditional, path: str, stale_after: float, exact_delete: bool) -> None:
        self.s3 = s3
        self.path = path
        self.stale_after = stale_after
        self.exact_delete = exact_delete
        self.previous: _Owner | None = None
        self._token = secrets.token_hex(8)
        self._started = 0.0
        self._etag: str | None = None

    def _record(self) -> bytes:
        return _Owner.mine(self._token, self._started).to_bytes()

    def _current(self) -> tuple[_Owner, str] | None:
        found = self.s3.read(self.path)
        if found is None:
            return None
        blob, etag, mtime = found
        return _owner_or_age(blob, mtime), etag

    def _ours(self) -> str | None:
        """The lease's ETag if the record there is ours (a write whose reply was lost), else None."""
        current = self._current()
        return current[1] if current is not None and current[0].token == self._token else None

    def holder(self) -> _Owner | None:
        current = self._current()
        return None if current is None else current[0]

    def try_acquire(self) -> bool:
        now = time.time()
        current = self._current()
        self._started = now
        self.previous = None
        if current is None:
            self._etag = self.s3.put(self.path, self._record())
        else:
            owner, etag = current
            if owner.token == self._token:
                self._etag = etag
                return True
            if not owner.stale(now, self.stale_after):
                return False
            log.warning("taking over the lease %s from %s", self.path, owner.describe(now))
            self.previous = owner
            self._etag = self.s3.put(self.path, self._record(), if_match=etag)
        if self._etag is None:
            self._etag = self._ours()
        return self._etag is not None

    def refresh(self) -> None:
        if self._etag is None:
            return
        etag = self.s3.put(self.path, self._record(), if_match=self._etag) or self._ours()
        if etag is None:
            current = self.holder()
            log.warning("lost the lease %s to %s; finishing the build anyway", self.path,
                        current.describe(time.time()) if current else "nobody")
        self._etag = etag

    def release(self) -> None:
        etag, self._etag = self._etag, None
        if etag is None:
            return
        if self.exact_delete:
            self.s3.delete(self.path, etag)
            return
        current = self._current()
        if current is not None and current[1] == etag:
            self.s3.delete(self.path, None)

    def break_if_stale(self) -> _Owner | None:
        return None  # try_acquire takes over stale leases itself

    def discard_if_stale(self, now: float) -> bool:
        """Delete the lease if its holder is stale (for ``gc``); True if it was deleted."""
        current = self._current()
        if current is None or not current[0].stale(now, self.stale_after):
            return False
        return self.s3.delete(self.path, current[1] if self.exact_delete else None)


class _Heartbeat:
    """Refreshes a lock's owner record every ``interval`` seconds while a build runs."""

    def __init__(self, lock: _Lock, interval: float) -> None:
        self._lock = lock
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="artifact-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._lock.refresh()
            except Exception as exc:  # a missed heartbeat must not kill the build
                log.warning("artifact lock heartbeat failed: %s", exc)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wsss_tune" / "artifacts"


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class ArtifactStore:
    """Stage artifacts on a local path or a pyarrow filesystem; see the module docstring.

    Args:
        uri: Local folder (relative paths are made absolute now, because Ray changes a trial's
            working directory) or a pyarrow filesystem URI (``file:///...``, ``s3://bucket/prefix``).
            With ``filesystem``, a path inside that filesystem.
        filesystem: A pyarrow filesystem to use instead of parsing ``uri`` (e.g. a
            ``SubTreeFileSystem``); the store then uses the remote protocol.
        cache_dir: Local folder for verified copies of remote artifacts and remote builds in
            progress. Default: ``$XDG_CACHE_HOME/wsss_tune/artifacts/<hash of the store>``.
        verify: ``sha256`` checks every byte on :meth:`get`; ``size`` only file sizes (faster for
            very large artifacts, but misses same-size corruption). Downloads are always hashed.
        heartbeat: Seconds between a builder's owner-record refreshes.
        stale_after: A holder silent for this long is considered dead and taken over.
        lease_settle: Remote leases without conditional writes (every remote store but ``s3://`` on a
            server that honours them; see :attr:`claim_mode`): seconds between writing a claim and
            reading it back.

    Raises:
        ImportError: an ``s3://`` store without boto3 installed (``pip install 'wsss-tune[s3]'``).
    """

    def __init__(
        self,
        *,
        uri: str,
        filesystem: pafs.FileSystem | None = None,
        cache_dir: str | Path | None = None,
        verify: Literal["sha256", "size"] = "sha256",
        heartbeat: float = DEFAULT_HEARTBEAT,
        stale_after: float = DEFAULT_STALE_AFTER,
        lease_settle: float = DEFAULT_LEASE_SETTLE,
    ) -> None:
        if not isinstance(uri, str) or not uri.strip():
            raise ValueError(f"artifact store uri {uri!r}: expected a local path or a filesystem URI")
        if verify not in ("sha256", "size"):
            raise ValueError(f"artifact store verify={verify!r}: expected 'sha256' or 'size'")
        if not heartbeat > 0 or not stale_after > 2 * heartbeat:
            raise ValueError(f"artifact store heartbeat={heartbeat}, stale_after={stale_after}: expected "
                             "heartbeat > 0 and stale_after > 2 * heartbeat (else live builders look dead)")
        if lease_settle < 0:
            raise ValueError(f"artifact store lease_settle={lease_settle}: expected >= 0")
        self.uri = uri
        self.verify = verify
        self.heartbeat = float(heartbeat)
        self.stale_after = float(stale_after)
        self.lease_settle = float(lease_settle)
        self._fs: pafs.FileSystem | None
        if filesystem is not None:
            self._fs, self._rroot = filesystem, uri.rstrip("/") or "/"
        elif "://" in uri:
            try:
                self._fs, self._rroot = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as exc:
                raise ValueError(f"artifact store uri {uri!r}: pyarrow cannot open it ({exc})") from None
        else:
            self._fs, self._rroot = None, ""
        self._root = Path(uri).expanduser().resolve() if self._fs is None else None
        # s3:// stores claim builds with conditional writes once the server is seen to honour them
        # (checked on the first claim); None: the portable lease.
        self._s3 = (_S3Conditional.for_filesystem(self._fs, uri)
                    if self._fs is not None and self._fs.type_name == "s3" else None)
        self._s3_checked = False
        self._s3_exact_delete = True
        ident = self.uri if filesystem is None else f"{filesystem.type_name}:{getattr(filesystem, 'base_path', '')}:{uri}"
        self.cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else _default_cache_root() / config_hash(ident)
        self.hits = 0
        self.misses = 0
        #: Corrupted published artifacts this object found and rebuilt (counted when the rebuild
        #: starts); :attr:`repaired` says which and what was wrong. A trial reports the count.
        self.repairs = 0
        self.repaired: builtins.list[tuple[str, str]] = []
        self._build_seconds = 0.0
        self._saved_seconds = 0.0

    def __repr__(self) -> str:
        return f"ArtifactStore(uri={self.uri!r}, remote={self.is_remote})"

    @property
    def is_remote(self) -> bool:
        """True when the store goes through a pyarrow filesystem (leases, upload, local cache)."""
        return self._fs is not None

    @property
    def claim_mode(self) -> Literal["file lock", "conditional write", "settle"]:
        """How processes agree on who builds an artifact: ``file lock`` (a local store), ``conditional
        write`` (an ``s3://`` store whose server honours ``If-None-Match`` / ``If-Match``; no timing
        assumption) or ``settle`` (other remote stores: write a claim, wait ``lease_settle``, read it
        back). For an ``s3://`` store the first call checks the server with a probe object."""
        if self._fs is None:
            return "file lock"
        return "conditional write" if self._conditional() is not None else "settle"

    def _conditional(self) -> _S3Conditional | None:
        """The conditional writer for this store's leases, once its server is seen to honour the
        conditions (checked once per store object); None for the portable lease."""
        if self._s3 is not None and not self._s3_checked:
            ignored = self._s3.ignored_conditions(posixpath.join(self._rroot, _LOCKS))
            if any(name.startswith(("If-None-Match on PutObject", "If-Match on PutObject")) for name in ignored):
                log.warning("artifact store %s: the S3 server %s ignores or refuses %s; builds are claimed with "
                            "the portable lease (write, wait %.2fs, read back) instead of conditional writes",
                            self.uri, self._s3.where, "; ".join(ignored), self.lease_settle)
                self._s3 = None
            elif ignored:
                log.warning("artifact store %s: the S3 server %s ignores or refuses %s; a lease is released by "
                            "reading its ETag and then deleting it", self.uri, self._s3.where, ignored[0])
                self._s3_exact_delete = False
            self._s3_checked = True
        return self._s3

    # ---- keys and paths ------------------------------------------------------------------------

    def key(self, stage: str, *parts: Any) -> ArtifactKey:
        """Key of ``stage``'s output given everything upstream (configs, data fingerprint, ...)."""
        plain = tuple(_plain(p, f"[{i}]") for i, p in enumerate(parts))
        return ArtifactKey(stage=stage, digest=config_hash(*parts), parts=plain)

    def _local_dir(self, key: ArtifactKey) -> Path:
        assert self._root is not None
        return self._root / key.stage / key.digest

    def _rdir(self, key: ArtifactKey) -> str:
        return posixpath.join(self._rroot, key.stage, key.digest)

    def _cache_path(self, key: ArtifactKey) -> Path:
        return self.cache_dir / key.stage / key.digest

    def _work_path(self, key: ArtifactKey) -> Path:
        root = self._root if self._root is not None else self.cache_dir
        return root / _WORK / key.stage / key.digest

    def work_dir(self, key: ArtifactKey) -> Path:
        """A local scratch folder for building ``key`` that survives a crash (e.g. for checkpoints).

        Use it inside ``build``, where the key's lock is held. A killed build leaves it in place, so
        the next build of the key can resume from it; it is deleted once the artifact is published.
        For a remote store it lives in the local cache folder, so only a build on the same host
        resumes.
        """
        path = self._work_path(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _lock(self, key: ArtifactKey) -> _Lock:
        if self._fs is None:
            assert self._root is not None
            return _LocalLock(path=self._root / _LOCKS / key.stage / f"{key.digest}.lock",
                              stale_after=self.stale_after)
        return self._lease_at(posixpath.join(self._rroot, _LOCKS, key.stage, f"{key.digest}.lease"))

    def _lease_at(self, path: str) -> _Lease | _S3Lease:
        """The remote lease at ``path``: conditional writes where the server honours them."""
        assert self._fs is not None
        s3 = self._conditional()
        if s3 is not None:
            return _S3Lease(s3=s3, path=path, stale_after=self.stale_after, exact_delete=self._s3_exact_delete)
        return _Lease(fs=self._fs, path=path, stale_after=self.stale_after, settle=self.lease_settle)

    def _cache_filelock(self, key: ArtifactKey) -> filelock.BaseFileLock:
        """Serialises this host's processes that fill or replace the same cache entry."""
        path = self.cache_dir / _LOCKS / key.stage / f"{key.digest}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(path), thread_local=False)

    @contextlib.contextmanager
    def _cache_lock(self, key: ArtifactKey) -> Iterator[None]:
        with self._cache_filelock(key):
            yield

    # ---- reading -------------------------------------------------------------------------------

    def require_exists(self) -> None:
        """Raise FileNotFoundError naming the store when its folder does not exist.

        A store is created by its first build, so reading a missing one gives nothing; commands that
        inspect a store (``wsss-tune cache ls`` / ``gc``) call this so that a mistyped path is an error,
        not "0 artifacts".
        """
        if self._fs is None:
            assert self._root is not None
            if self._root.is_dir():
                return
            what = "is not a folder" if self._root.exists() else "does not exist"
        else:
            if self._fs.get_file_info(self._rroot).type == pafs.FileType.Directory:
                return
            what = "does not exist (no such folder in that filesystem)"
        raise FileNotFoundError(f"artifact store {self._root or self.uri} {what}; expected the store a sweep or run "
                                "wrote (a sweep's default is <storage>/artifacts, e.g. experiments/artifacts; a "
                                "run's is run.artifact_store)")

    def exists(self, key: ArtifactKey) -> bool:
        """Whether ``key`` is published (its manifest exists). Cheap; does not verify the files."""
        if self._fs is None:
            return (self._local_dir(key) / MANIFEST_NAME).is_file()
        return self._fs.get_file_info(posixpath.join(self._rdir(key), MANIFEST_NAME)).type == pafs.FileType.File

    def get(self, key: ArtifactKey) -> Path | None:
        """Local path of the verified artifact folder, or None if it is missing or corrupted.

        For a remote store the files are downloaded (and hashed) into the local cache first; a
        cached copy is reused while it still matches the remote manifest.
        """
        found = self._lookup(key)
        return None if found is None else found[0]

    def _lookup(self, key: ArtifactKey) -> tuple[Path, dict[str, Any]] | None:
        return self._verified(key)[0]

    def _verified(self, key: ArtifactKey) -> tuple[tuple[Path, dict[str, Any]] | None, str | None]:
        """``(folder and manifest, None)`` of a verified artifact; ``(None, what is wrong)`` for a
        corrupted one; ``(None, None)`` when it is not published."""
        try:
            return (self._lookup_local(key) if self._fs is None else self._lookup_remote(key)), None
        except _Corrupt as exc:
            log.warning("artifact %s in %s is corrupted and will not be used: %s", key, self.uri, exc)
            return None, str(exc)

    def _lookup_local(self, key: ArtifactKey) -> tuple[Path, dict[str, Any]] | None:
        folder = self._local_dir(key)
        try:
            blob = (folder / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            return None
        manifest = _parse_manifest(blob, key)
        problems = _verify_dir(folder, manifest, self.verify)
        if problems:
            raise _Corrupt("; ".join(problems))
        return folder, manifest

    def _lookup_remote(self, key: ArtifactKey) -> tuple[Path, dict[str, Any]] | None:
        assert self._fs is not None
        rdir = self._rdir(key)
        blob = _read_remote(self._fs, posixpath.join(rdir, MANIFEST_NAME))
        if blob is None:
            return None
        manifest = _parse_manifest(blob, key)
        local = self._cache_path(key)
        with self._cache_lock(key):
            cached = local / MANIFEST_NAME
            if cached.is_file() and cached.read_bytes() == blob:
                problems = _verify_dir(local, manifest, self.verify)
                if not problems:
                    return local, manifest
                log.warning("cached copy of artifact %s is damaged (%s); downloading again", key, "; ".join(problems))
            with atomic_dir(local) as tmp:
                for rel, meta in manifest["files"].items():
                    self._download(posixpath.join(rdir, rel), tmp / rel, meta, rel)
                (tmp / MANIFEST_NAME).write_bytes(blob)
        return local, manifest

    def _download(self, src: str, dst: Path, meta: Mapping[str, Any], rel: str) -> None:
        assert self._fs is not None
        dst.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with self._fs.open_input_stream(src) as fin, dst.open("wb") as fout:
                while block := fin.read(_CHUNK):
                    digest.update(block)
                    size += len(block)
                    fout.write(block)
        except FileNotFoundError:
            raise _Corrupt(f"{rel}: missing") from None
        if size != meta["size"]:
            raise _Corrupt(f"{rel}: {size} bytes, manifest says {meta['size']}")
        if digest.hexdigest() != meta["sha256"]:
            raise _Corrupt(f"{rel}: sha256 differs from the manifest")

    # ---- building ------------------------------------------------------------------------------

    def get_or_create(
        self,
        key: ArtifactKey,
        build: Callable[[Path], Mapping[str, Any] | None],
        *,
        wait_timeout: float | None = None,
        poll: float = DEFAULT_POLL,
    ) -> Artifact:
        """Return the artifact for ``key``, building it with ``build(folder)`` if needed.

        ``build`` writes the artifact's files into the empty private folder it is given and may
        return a JSON-serialisable dict of metadata (e.g. metrics) for the manifest. Across
        processes the build runs once; others wait (polling every ``poll`` seconds, for at most
        ``wait_timeout`` seconds, or as long as the builder stays alive if None) and then read the
        result. A corrupted published artifact is rebuilt. If ``build`` raises, nothing is published,
        the lock is released and the exception propagates.

        Raises:
            ArtifactWaitTimeout: another live process was still building after ``wait_timeout``.
        """
        if poll <= 0:
            raise ValueError(f"get_or_create poll={poll}: expected > 0")
        found = self._lookup(key)
        if found is not None:
            return self._hit(key, *found)
        rejected = self._read_manifest_blob(key)  # a corrupted artifact's manifest, if any
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        lock = self._lock(key)
        announced = False
        while True:
            if lock.try_acquire():
                try:
                    found, problem = self._verified(key)  # published while we waited?
                    if found is not None:
                        return self._hit(key, *found)
                    prev = lock.previous
                    if prev is not None and prev.stale(time.time(), self.stale_after):
                        log.warning("artifact %s: the previous builder (%s) died before publishing; rebuilding",
                                    key, prev.describe(time.time()))
                    if problem is not None:
                        self.repairs += 1
                        self.repaired.append((str(key), problem))
                        log.warning("artifact %s in %s: rebuilding the corrupted copy (%s)", key, self.uri, problem)
                    return self._build(key, build, lock)
                finally:
                    lock.release()
            blob = self._read_manifest_blob(key)
            if blob is not None and blob != rejected:  # newly published: read it without the lock
                found = self._lookup(key)
                if found is not None:
                    return self._hit(key, *found)
                rejected = blob
            lock.break_if_stale()
            holder = lock.holder()
            if deadline is not None and time.monotonic() >= deadline:
                who = holder.describe(time.time()) if holder else "another process"
                raise ArtifactWaitTimeout(f"gave up after {wait_timeout}s waiting for artifact {key} in "
                                          f"{self.uri}: it is being built by {who}")
            if not announced:
                log.info("artifact %s is being built by %s; waiting", key,
                         holder.describe(time.time()) if holder else "another process")
                announced = True
            time.sleep(poll)

    def _hit(self, key: ArtifactKey, path: Path, manifest: dict[str, Any]) -> Artifact:
        art = Artifact(key=key, path=path, manifest=manifest, hit=True)
        self.hits += 1
        self._saved_seconds += art.build_seconds
        return art

    def _manifest(self, key: ArtifactKey, folder: Path, metadata: dict[str, Any], seconds: float) -> dict[str, Any]:
        now = time.time()
        return {
            "format": MANIFEST_FORMAT,
            "key": str(key),
            "stage": key.stage,
            "digest": key.digest,
            "parts": list(key.parts),
            "files": _scan(folder, key),
            "metadata": metadata,
            "build_seconds": round(seconds, 3),
            "created": now,
            "created_iso": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def _build(self, key: ArtifactKey, build: Callable[[Path], Mapping[str, Any] | None], lock: _Lock) -> Artifact:
        """Run ``build`` under the held ``lock`` and publish its folder."""
        if self._fs is None:
            final = self._local_dir(key)
            self._remove_leftovers(final)
            with _Heartbeat(lock, self.heartbeat), atomic_dir(final) as tmp:
                manifest = self._run_build(key, build, tmp)
                atomic_write_bytes(tmp / MANIFEST_NAME, _dump(manifest))
        else:
            assert self._fs is not None
            with contextlib.suppress(FileNotFoundError):  # a corrupted copy: untrust it now, not after the build
                self._fs.delete_file(posixpath.join(self._rdir(key), MANIFEST_NAME))
            final = self._cache_path(key)
            with self._cache_lock(key):
                self._remove_leftovers(final)
            cache_lock = self._cache_filelock(key)
            with _Heartbeat(lock, self.heartbeat), contextlib.ExitStack() as stack:
                # Exits run in reverse: the temp folder is renamed into the cache, then the cache
                # lock is released. It is taken only for that rename, never during the build, so a
                # frozen builder cannot block this host's cache.
                stack.callback(lambda: cache_lock.release() if cache_lock.is_locked else None)
                tmp = stack.enter_context(atomic_dir(final))
                manifest = self._run_build(key, build, tmp)
                blob = _dump(manifest)
                self._upload(key, tmp, manifest, blob)
                (tmp / MANIFEST_NAME).write_bytes(blob)
                cache_lock.acquire()
        _rmtree(self._work_path(key))  # published: nothing left to resume
        self.misses += 1
        self._build_seconds += manifest["build_seconds"]
        return Artifact(key=key, path=final, manifest=manifest, hit=False)

    def _run_build(self, key: ArtifactKey, build: Callable[[Path], Mapping[str, Any] | None], tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        metadata = _check_metadata(build(tmp), key)
        return self._manifest(key, tmp, metadata, time.perf_counter() - t0)

    def _upload(self, key: ArtifactKey, folder: Path, manifest: Mapping[str, Any], blob: bytes) -> None:
        """Replace the remote folder's contents with ``folder``'s files, then write the manifest."""
        assert self._fs is not None
        fs, rdir = self._fs, self._rdir(key)
        if fs.get_file_info(rdir).type != pafs.FileType.NotFound:
            with contextlib.suppress(FileNotFoundError):  # untrust it first, then clear it
                fs.delete_file(posixpath.join(rdir, MANIFEST_NAME))
            fs.delete_dir_contents(rdir, missing_dir_ok=True)
        fs.create_dir(rdir, recursive=True)
        for rel in manifest["files"]:
            dst = posixpath.join(rdir, rel)
            if "/" in rel:
                fs.create_dir(posixpath.dirname(dst), recursive=True)
            with (folder / rel).open("rb") as fin, fs.open_output_stream(dst) as fout:
                while block := fin.read(_CHUNK):
                    fout.write(block)
        _write_remote(fs, posixpath.join(rdir, MANIFEST_NAME), blob,
                      tmp=posixpath.join(rdir, f".{MANIFEST_NAME}.{secrets.token_hex(6)}.tmp"))

    @staticmethod
    def _remove_leftovers(final: Path) -> list[Path]:
        """Temporary folders that crashed builds of ``final`` left behind (call with the lock held)."""
        found = [p for p in final.parent.glob(f".{final.name}.*") if p.name.endswith((".tmp", ".old"))]
        for p in found:
            _rmtree(p)
        return found

    # ---- listing and removal -------------------------------------------------------------------

    def _stage_names(self, stage: str | None) -> builtins.list[str]:
        if stage is not None:
            ArtifactKey(stage=stage, digest="0")  # validates the name
            return [stage]
        if self._fs is None:
            assert self._root is not None
            if not self._root.is_dir():
                return []
            return sorted(p.name for p in self._root.iterdir() if p.is_dir() and _STAGE_RE.match(p.name))
        infos = self._fs.get_file_info(pafs.FileSelector(self._rroot, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and _STAGE_RE.match(i.base_name))

    def _digests(self, stage: str) -> builtins.list[str]:
        if self._fs is None:
            assert self._root is not None
            folder = self._root / stage
            names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        else:
            sel = pafs.FileSelector(posixpath.join(self._rroot, stage), allow_not_found=True)
            names = [i.base_name for i in self._fs.get_file_info(sel) if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if _DIGEST_RE.match(n))

    def _read_manifest_blob(self, key: ArtifactKey) -> bytes | None:
        if self._fs is None:
            try:
                return (self._local_dir(key) / MANIFEST_NAME).read_bytes()
            except FileNotFoundError:
                return None
        return _read_remote(self._fs, posixpath.join(self._rdir(key), MANIFEST_NAME))

    def list(self, stage: str | None = None) -> builtins.list[ArtifactInfo]:
        """Published artifacts (optionally of one stage), from their manifests; files are not verified."""
        out = []
        for st in self._stage_names(stage):
            for digest in self._digests(st):
                key = ArtifactKey(stage=st, digest=digest)
                blob = self._read_manifest_blob(key)
                if blob is None:
                    continue
                try:
                    m = _parse_manifest(blob, key)
                except _Corrupt as exc:
                    log.warning("artifact %s has an unreadable manifest (%s); skipped", key, exc)
                    continue
                files = m["files"]
                location = str(self._local_dir(key)) if self._fs is None else self._rdir(key)
                out.append(ArtifactInfo(
                    key=ArtifactKey(stage=st, digest=digest, parts=tuple(m.get("parts", ()))),
                    created=float(m.get("created", 0.0)),
                    size_bytes=sum(f["size"] for f in files.values()),
                    num_files=len(files),
                    build_seconds=float(m.get("build_seconds", 0.0)),
                    metadata=dict(m.get("metadata", {})),
                    location=location,
                ))
        return out

    def remove(self, key: ArtifactKey) -> bool:
        """Delete a published artifact (and its local cached copy); True if it existed."""
        existed = False
        if self._fs is None:
            folder = self._local_dir(key)
            if folder.exists():
                assert self._root is not None
                trash = self._root / _TRASH / f"{key.stage}.{key.digest}.{secrets.token_hex(4)}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder, trash)  # disappears at once; deleting may take a while
                _rmtree(trash)
                existed = True
        else:
            rdir = self._rdir(key)
            if self._fs.get_file_info(rdir).type != pafs.FileType.NotFound:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.delete_file(posixpath.join(rdir, MANIFEST_NAME))
                self._fs.delete_dir(rdir)
                existed = True
            cached = self._cache_path(key)
            if cached.exists():
                with self._cache_lock(key):
                    _rmtree(cached)
        return existed

    def gc(
        self,
        keep: Callable[[ArtifactInfo], bool] | None = None,
        *,
        older_than: float | datetime.timedelta | None = None,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove artifacts, and clean what crashed builds left behind.

        An artifact is removed when it is older than ``older_than`` (seconds or a timedelta) and
        ``keep(info)`` is not true; with only one of the two given, that one decides. With neither,
        no artifact is removed and only the housekeeping runs: temporary folders of dead builds,
        stale locks, half-finished remote uploads, cached copies of artifacts that are gone, work
        folders of published artifacts and (with ``older_than``) work folders untouched that long.
        ``dry_run`` reports what would be removed and changes nothing.
        """
        if isinstance(older_than, datetime.timedelta):
            older_than = older_than.total_seconds()
        if older_than is not None and older_than < 0:
            raise ValueError(f"gc older_than={older_than}: expected >= 0 seconds")
        removed: builtins.list[ArtifactInfo] = []
        if keep is not None or older_than is not None:
            for info in self.list():
                if older_than is not None and info.age_seconds <= older_than:
                    continue
                if keep is not None and keep(info):
                    continue
                removed.append(info)
        cleaned: builtins.list[str] = []
        if not dry_run:
            for info in removed:
                self.remove(info.key)
            cleaned = self._housekeeping(older_than)
        return GcReport(removed=tuple(removed), freed_bytes=sum(i.size_bytes for i in removed),
                        cleaned=tuple(cleaned), dry_run=dry_run)

    def _housekeeping(self, older_than: float | None) -> builtins.list[str]:
        if self._fs is None:
            assert self._root is not None
            return self._clean_local_root(self._root, older_than)
        cleaned = self._clean_remote_orphans()
        if self.cache_dir.is_dir():
            for stage in sorted(p.name for p in self.cache_dir.iterdir() if p.is_dir() and _STAGE_RE.match(p.name)):
                for folder in sorted(self.cache_dir.joinpath(stage).iterdir()):
                    if not folder.is_dir() or not _DIGEST_RE.match(folder.name):
                        continue
                    key = ArtifactKey(stage=stage, digest=folder.name)
                    if not self.exists(key):  # removed from the store: drop the cached copy
                        with self._cache_lock(key):
                            _rmtree(folder)
                        cleaned.append(str(folder))
            cleaned += self._clean_local_root(self.cache_dir, older_than)
        return cleaned

    @contextlib.contextmanager
    def _if_idle(self, key: ArtifactKey) -> Iterator[bool]:
        """Yield whether no process is building ``key``; for a local store, hold its lock meanwhile."""
        if self._fs is not None:
            owner = self._lock(key).holder()
            yield owner is None or owner.stale(time.time(), self.stale_after)
            return
        lock = self._lock(key)
        assert isinstance(lock, _LocalLock)
        if not lock.try_acquire():
            yield False
            return
        try:
            yield True
            lock.discard()  # nobody needs this lock file now; a waiter retries on a new one
        finally:
            lock.release()

    def _clean_local_root(self, root: Path, older_than: float | None) -> builtins.list[str]:
        """Under a local ``root`` (the store, or a remote store's cache): remove trash, temp folders
        of dead builds, work folders of published keys and, with ``older_than``, work folders left
        untouched that long. A key is cleaned only while nobody builds it."""
        cleaned: builtins.list[str] = []
        if not root.is_dir():
            return cleaned
        trash = root / _TRASH
        if trash.is_dir():
            for p in sorted(trash.iterdir()):
                _rmtree(p)
                cleaned.append(str(p))
        keys: set[tuple[str, str]] = set()
        for stage_dir in (p for p in root.iterdir() if p.is_dir() and _STAGE_RE.match(p.name)):
            for p in stage_dir.glob(".*"):
                if p.name.endswith((".tmp", ".old")) and len(p.name.split(".")) > 2:
                    keys.add((stage_dir.name, p.name.split(".")[1]))
        for sub, pattern in ((_LOCKS, "*.lock"), (_WORK, "*")):
            if (root / sub).is_dir():
                for stage_dir in (p for p in (root / sub).iterdir() if p.is_dir()):
                    keys.update((stage_dir.name, p.name.removesuffix(".lock")) for p in stage_dir.glob(pattern))
                    # an owner record's temp file, left by a holder killed while writing it
                    keys.update((stage_dir.name, p.name.split(".")[1]) for p in stage_dir.glob(".*.tmp"))
        now = time.time()
        for stage, digest in sorted(keys):
            if not (_STAGE_RE.match(stage) and _DIGEST_RE.match(digest)):
                continue
            key = ArtifactKey(stage=stage, digest=digest)
            with self._if_idle(key) as idle:
                if not idle:
                    continue
                cleaned += [str(p) for p in self._remove_leftovers(root / stage / digest)]
                for stray in (root / _LOCKS / stage).glob(f".{digest}.lock.*.tmp"):
                    stray.unlink(missing_ok=True)
                    cleaned.append(str(stray))
                work = root / _WORK / stage / digest
                if work.is_dir() and (self.exists(key) or (older_than is not None
                                                           and now - work.stat().st_mtime > older_than)):
                    _rmtree(work)
                    cleaned.append(str(work))
        return cleaned

    def _clean_remote_orphans(self) -> builtins.list[str]:
        """Delete remote folders without a manifest (crashed uploads) and leases of dead holders."""
        assert self._fs is not None
        cleaned: builtins.list[str] = []
        for stage in self._stage_names(None):
            for digest in self._digests(stage):
                key = ArtifactKey(stage=stage, digest=digest)
                if self.exists(key):
                    continue
                lease = self._lock(key)
                if not lease.try_acquire():
                    continue  # someone is uploading it right now
                try:
                    if not self.exists(key):
                        self._fs.delete_dir(self._rdir(key))
                        cleaned.append(self._rdir(key))
                finally:
                    lease.release()
        selector = pafs.FileSelector(posixpath.join(self._rroot, _LOCKS), recursive=True, allow_not_found=True)
        now = time.time()
        for info in self._fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            if info.base_name.endswith(".lease"):
                if self._lease_at(info.path).discard_if_stale(now):
                    cleaned.append(info.path)
                continue
            # a claim interrupted between its write and its move, or a server probe of a killed process
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            if info.base_name.endswith(".tmp") and now - mtime > self.stale_after:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.delete_file(info.path)
                cleaned.append(info.path)
        return cleaned

    def stats(self) -> dict[str, Any]:
        """Inventory of the store plus this process's cache hits, misses and build time saved."""
        by_stage: dict[str, dict[str, int]] = {}
        for info in self.list():
            s = by_stage.setdefault(info.key.stage, {"artifacts": 0, "bytes": 0})
            s["artifacts"] += 1
            s["bytes"] += info.size_bytes
        return {
            "uri": self.uri,
            "remote": self.is_remote,
            "artifacts": sum(s["artifacts"] for s in by_stage.values()),
            "bytes": sum(s["bytes"] for s in by_stage.values()),
            "by_stage": by_stage,
            "hits": self.hits,
            "misses": self.misses,
            "repairs": self.repairs,
            "build_seconds": round(self._build_seconds, 3),
            "saved_seconds": round(self._saved_seconds, 3),
        }
