"""Small shared helpers: atomic file writes, device selection, seeding.

The torch-dependent helpers (:mod:`wsss_tune.utils.runtime`) are imported on first use, so that code
which only needs atomic writes (the artifact store, the CLI) does not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from wsss_tune.utils.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
)

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "autocast",
    "file_sha256",
    "resolve_device",
    "seed_everything",
]

_RUNTIME = ("autocast", "resolve_device", "seed_everything")


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        from wsss_tune.utils import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'wsss_tune.utils' has no attribute {name!r}")
