"""Small shared helpers: atomic file writes, device selection, seeding."""

from wsss_tune.utils.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from wsss_tune.utils.runtime import autocast, resolve_device, seed_everything

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "autocast",
    "resolve_device",
    "seed_everything",
]
