"""The report renders from a saved experiment: files exist, PNGs decode, the HTML embeds everything;
the CLI command writes it; W&B offline logging writes an offline run with the same tables and figures."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from test_analysis_data import make_experiment

from wsss_tune.analysis.figures import QUALITATIVE_COLUMNS, qualitative_data
from wsss_tune.analysis.report import compute_report, markdown_table, write_report
from wsss_tune.analysis.results import load_experiment

FIGURES = {"stages", "history", "importances", "slices", "parallel", "curves", "per_class", "compute", "qualitative"}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    return make_experiment(tmp_path_factory.mktemp("report") / "exp-a", synth_root)


@pytest.fixture(scope="module")
def report(experiment: Path):  # noqa: ANN201 - a Report
    return compute_report(experiment, images=2)


def test_report_files_and_embedded_html(report, tmp_path: Path) -> None:  # noqa: ANN001
    """Every figure is a PNG that decodes, every table a CSV; the HTML's only image sources are
    ``data:image/png;base64`` URIs (one per figure), it has no link, script or stylesheet reference,
    and it names no path of this machine."""
    files = write_report(report, tmp_path / "out")
    assert files.html.is_file() and files.markdown.is_file()
    assert set(files.figures) == FIGURES
    for path in files.figures.values():
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and img.size[0] > 100
    for name, path in files.tables.items():
        assert path.is_file(), name
    assert pd.read_csv(files.tables["stages"])["stage"].tolist() == ["CAM", "EPS pseudo-mask", "refined", "DeepLab"]
    page = files.html.read_text()
    sources = re.findall(r"src=['\"]([^'\"]*)['\"]", page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    for bad in ("href=", "<script", "<link", "url(", "http://", "https://", "file:"):
        assert bad not in page, bad
    assert str(tmp_path) not in page and str(report.exp.path) not in page
    for s in sources:
        import base64

        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as img:
            img.load()


def test_markdown_summary(report, tmp_path: Path) -> None:  # noqa: ANN001
    """The Markdown names the best trial and its held-out value, shows the stage table (DeepLab row:
    reference 66 / 63, best 72 / 70) and links the figures relative to itself."""
    text = write_report(report, tmp_path / "out").markdown.read_text()
    assert "Best trial t00001" in text and "deeplab_miou_heldout = 70.00" in text
    assert "| DeepLab | 66.00 | 63.00 | 72.00 | 70.00 |" in text
    assert "![Slices](figures/slices.png)" in text
    assert "not computed: fANOVA needs at least 5" in text
    assert "Failed trial t00004: DivergedError" in text


def test_qualitative_columns_skip_what_is_missing(experiment: Path) -> None:
    """The best trial has EPS masks, refined masks and CAMs, no DeepLab predictions; the CAM-baseline
    trial has no masks, so the CAM column is the best trial's CAM heat map. Images come from the
    held-out half of ``train`` and every cell matches the input's size."""
    data = qualitative_data(load_experiment(experiment), images=3)
    assert data is not None
    assert data.columns == tuple(c for c in QUALITATIVE_COLUMNS if c != "DeepLab")
    assert "not available: DeepLab" in data.note and "activation maps" in data.note
    for row in data.rows:
        h, w = row["input"].shape[:2]
        assert all(a.shape == (h, w, 3) and a.dtype.name == "uint8" for a in row.values())
    # EPS masks have the top-left 8x8 block set to background (black in the VOC palette).
    assert (data.rows[0]["EPS"][:8, :8] == 0).all()


def test_markdown_table_format() -> None:
    """Floats to 2 decimals, missing as '-', pipes escaped, booleans as yes/blank."""
    frame = pd.DataFrame({"a|b": [1.234, None], "ok": [True, False]})
    assert markdown_table(frame).splitlines() == ["| a\\|b | ok |", "|---|---|", "| 1.23 | yes |", "| - |  |"]


def test_cli_report(experiment: Path, tmp_path: Path) -> None:
    """``wsss-tune report EXP --out DIR`` writes the HTML and says where; a missing folder exits 2."""
    from typer.testing import CliRunner

    from wsss_tune.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["report", str(experiment), "--out", str(tmp_path / "r"), "--images", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.html").is_file()
    assert "report.html" in res.output
    bad = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not an experiment folder" in bad.output


def test_wandb_offline_run(report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Offline logging writes an offline run under WANDB_DIR holding every table (as W&B table JSON,
    the stage table's DeepLab row included) and every figure (as PNG), ready for ``wandb sync``."""
    pytest.importorskip("wandb")
    from wsss_tune.analysis.wandb_log import log_report_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = log_report_to_wandb(report.exp, report.tables, report.figures, "offline")
    assert run_dir.name.startswith("offline-run-") and run_dir.is_relative_to(tmp_path)
    assert list(run_dir.glob("run-*.wandb"))
    media = run_dir / "files" / "media"
    pngs = {p.name.split("_")[0] for p in (media / "images" / "figures").glob("*.png")}
    assert {"per", "stages", "qualitative"} <= pngs
    tables = {p.name.rsplit("_", 2)[0]: p for p in (media / "table" / "tables").glob("*.table.json")}
    assert set(tables) == set(report.tables)
    stages = json.loads(tables["stages"].read_text())
    deeplab = next(r for r in stages["data"] if r[0] == "DeepLab")
    assert deeplab[stages["columns"].index("best_heldout")] == 70.0
    with pytest.raises(ValueError, match="expected one of online, offline"):
        log_report_to_wandb(report.exp, report.tables, report.figures, "off")


def test_report_of_an_experiment_without_results(tmp_path: Path, synth_root: Path) -> None:
    """One failed trial and nothing else: every table is empty or says why, every figure still
    renders (a message instead of a plot), and the summary names the failure."""
    from test_analysis_data import TRIALS

    exp = make_experiment(tmp_path / "e", synth_root, trials=[TRIALS[4]])
    rep = compute_report(exp)
    assert set(rep.figures) == FIGURES and rep.tables["stages"].empty
    assert "no trial completed" in rep.tables["stages"].note
    files = write_report(rep, tmp_path / "out")
    assert "Failed trial t00004" in files.markdown.read_text()
    with Image.open(files.figures["qualitative"]) as img:
        img.load()
