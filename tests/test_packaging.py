"""A normal (non-editable) install: the wheel holds ``trainables/``, ``analysis/`` and
``search_spaces/`` as subpackages of ``wsss_tune`` (no generic top-level names), the built-in configs
and search spaces are found by name from the installed files, and the console script is declared."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What a wheel is built from (the sdist content that matters here).
_SOURCES = ("pyproject.toml", "README.md", "wsss_tune", "trainables", "analysis", "search_spaces")

_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import wsss_tune
from wsss_tune.config import load_config
from wsss_tune.spaces import list_spaces, load_space
import wsss_tune.analysis, wsss_tune.trainables
print(json.dumps({"file": wsss_tune.__file__, "spaces": sorted(list_spaces()),
                  "rw_metric": load_space("synth_rw").metric, "voc_backbone": load_config("voc").eps.backbone,
                  "analysis": wsss_tune.analysis.__file__, "trainables": wsss_tune.trainables.__file__}))
"""


@pytest.mark.slow
def test_wheel_installs_subpackages_and_finds_builtin_spaces(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in _SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("wsss_tune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"wsss_tune"}, tops
    assert {"wsss_tune/trainables/__init__.py", "wsss_tune/analysis/__init__.py",
            "wsss_tune/search_spaces/synth_rw.yaml", "wsss_tune/configs/voc.yaml"} <= set(names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "wsss-tune = wsss_tune.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

    # Unpacking a pure-Python wheel is what installing it does to site-packages.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(site)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    for key in ("file", "analysis", "trainables"):
        assert Path(got[key]).is_relative_to(site), (key, got[key])
    assert {"eps", "rw", "deeplab", "pipeline", "synth_eps", "synth_rw", "synth_deeplab", "synth_pipeline"} \
        <= set(got["spaces"])
    assert got["rw_metric"] == "rw_miou_tune" and got["voc_backbone"] == "resnet38"
