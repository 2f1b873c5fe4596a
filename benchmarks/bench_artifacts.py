"""Artifact store overhead: publishing (hash + rename or upload), verified hits, cold remote reads.

One artifact = one large file (a checkpoint) plus many small ones (per-image masks). The build
itself is excluded: ``publish_s`` is the store's own time (scan, hash, manifest, rename/upload).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from wsss_tune.artifacts import ArtifactStore

#: Small files per artifact, like one pseudo-mask PNG per image of a small split.
SMALL_FILES = 200
#: Size of each small file (a 64 KiB mask PNG is typical for VOC-sized images).
SMALL_BYTES = 64 * 1024


def _measure(store: ArtifactStore, big: bytes, small: bytes, tag: str) -> dict[str, Any]:
    key = store.key("bench", tag, len(big))

    def build(folder: Path) -> None:
        (folder / "model.pt").write_bytes(big)
        (folder / "masks").mkdir()
        for i in range(SMALL_FILES):
            (folder / "masks" / f"{i:05d}.png").write_bytes(small)

    t0 = time.perf_counter()
    art = store.get_or_create(key, build)
    publish = time.perf_counter() - t0 - art.build_seconds
    t0 = time.perf_counter()
    assert store.get_or_create(key, build).hit
    hit = time.perf_counter() - t0
    row = {"publish_s": publish, "hit_s": hit}
    size_only = ArtifactStore(uri=store.uri, verify="size", cache_dir=store.cache_dir)
    t0 = time.perf_counter()
    assert size_only.get(key) is not None
    row["hit_size_only_s"] = time.perf_counter() - t0
    if store.is_remote:
        cold = ArtifactStore(uri=store.uri, cache_dir=Path(store.cache_dir).with_name("cold_cache"))
        t0 = time.perf_counter()
        assert cold.get(key) is not None
        row["cold_get_s"] = time.perf_counter() - t0
    return row


def run(quick: bool) -> list[dict[str, Any]]:
    sizes_mb = [16] if quick else [16, 256]
    small = os.urandom(SMALL_BYTES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes_mb:
            big = os.urandom(size * 1024 * 1024)
            total_mb = (len(big) + SMALL_FILES * SMALL_BYTES) / 2**20
            for name, uri in (("local path", str(Path(tmp) / "local")), ("file:// (remote protocol)", (Path(tmp) / "remote").as_uri())):
                store = ArtifactStore(uri=uri, cache_dir=Path(tmp) / f"cache_{size}")
                m = _measure(store, big, small, name)
                rows.append({"store": name, "files": 1 + SMALL_FILES, "MB": round(total_mb, 1), **m,
                             "hit_MB_per_s": total_mb / m["hit_s"]})
    return rows
