"""Atomic writes (a reader never sees a half-written file or folder) and file checksums.

**Permissions follow the umask.** Every file and folder these helpers create is made with
``open(..., 0o666)`` / ``mkdir(..., 0o777)`` and the kernel applies the process umask (and any
default ACL of the folder), as for any Unix tool: 0o644 / 0o755 under umask 0o022, 0o600 / 0o700
under 0o077. (``tempfile.mkstemp`` and ``mkdtemp`` would make every output private, 0o600 / 0o700,
whatever the umask.) The umask is never read or changed, so no other thread sees it altered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_copy", "atomic_dir",
           "file_sha256"]

#: Mode a new file is created with before the umask applies (what ``open(path, "w")`` uses).
FILE_MODE = 0o666
#: Mode a new folder is created with before the umask applies (what ``mkdir`` uses).
DIR_MODE = 0o777
#: Attempts at a free temporary name before giving up (each name has 48 random bits).
_TEMP_ATTEMPTS = 100
_O_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)

_T = TypeVar("_T")


def _temp_sibling(path: Path, make: Callable[[Path], _T]) -> tuple[Path, _T]:
    """Create a fresh ``.<name>.<random>.tmp`` next to ``path`` with ``make`` (which must fail with
    FileExistsError when the name is taken); returns it and what ``make`` returned.

    The name pattern is the one the leftover sweeps look for (``ArtifactStore``, ``prepare-voc``).
    """
    for _ in range(_TEMP_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, make(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name} after {_TEMP_ATTEMPTS} tries")


def _open_new(tmp: Path) -> int:
    return os.open(tmp, _O_FLAGS, FILE_MODE)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file gets the mode the umask gives a new file (see the module docstring); a file it
    replaces does not pass its mode on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _temp_sibling(path, _open_new)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


#: Block size of :func:`atomic_copy` and :func:`file_sha256` reads.
_CHUNK = 8 * 1024 * 1024


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy the file ``src`` to ``dst`` atomically (a temporary sibling, then ``os.replace``).

    ``dst`` gets the mode the umask gives a new file, as :func:`atomic_write_bytes` does, and
    ``src``'s modification time. Nothing is left at ``dst`` if the copy fails.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _temp_sibling(dst, _open_new)
    try:
        with os.fdopen(fd, "wb") as fout, src.open("rb") as fin:
            shutil.copyfileobj(fin, fout, _CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        st = src.stat()
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only if the block succeeds.

    An existing ``path`` is replaced; on error the temporary folder is removed and ``path`` is
    left as it was. The folder gets the mode the umask gives a new folder (module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _temp_sibling(path, lambda p: os.mkdir(p, DIR_MODE))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
