"""Every ``wsss-tune`` command fed bad inputs: one ``error:`` line naming the file or value, no traceback,
a non-zero exit (2 for an expected failure, 1 for a finding of a check command).

The cases form one table: missing files, folders where files belong and files where folders belong,
damaged results files (truncated, byte-flipped or overwritten parquet, JSON, SQLite), damaged YAML,
outputs under a regular file (which even root cannot write: tests run as root, so permission bits
would not stop them) or under ``/proc``, and bad ``--set`` and option values. Experiments are the
small saved experiment of ``test_analysis_data`` (no Ray); each damaged case works on its own copy.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_analysis_data import make_experiment
from typer.testing import CliRunner

from wsss_tune.cli import app

#: Output locations no user can create: under a regular file, and under a file of ``/proc``.
PROC_TARGET = "/proc/version/out"


class Workspace:
    """Paths a case builds its command line from (each case gets a fresh one in its tmp folder)."""

    def __init__(self, tmp: Path, experiment: Path, synth_root: Path) -> None:
        self.tmp = tmp
        self.pristine = experiment
        self.synth_root = synth_root
        self.blocker = tmp / "blocker"  # a regular file: nothing can be created under it
        self.blocker.write_text("I am a file, not a folder\n")
        self.missing = tmp / "missing"

    def exp(self, damage: Callable[[Path], None] | None = None) -> Path:
        """A private copy of the saved experiment, damaged by ``damage(folder)``."""
        exp = self.tmp / "exp"
        if not exp.exists():
            shutil.copytree(self.pristine, exp)
        if damage is not None:
            damage(exp)
        return exp

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# --------------------------------------------------------------------------------------------------
# Damage
# --------------------------------------------------------------------------------------------------


def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(exp: Path) -> None:
        data = (exp / name).read_bytes()
        (exp / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def flip(name: str, start: int, length: int = 32) -> Callable[[Path], None]:
    """XOR ``length`` bytes from ``start`` (negative: from the end) with 0xFF."""
    def damage(exp: Path) -> None:
        data = bytearray((exp / name).read_bytes())
        begin = start if start >= 0 else len(data) + start
        for i in range(begin, min(begin + length, len(data))):
            data[i] ^= 0xFF
        (exp / name).write_bytes(bytes(data))
    return damage


def overwrite(name: str, offset: int, blob: bytes) -> Callable[[Path], None]:
    def damage(exp: Path) -> None:
        data = bytearray((exp / name).read_bytes())
        data[offset: offset + len(blob)] = blob
        (exp / name).write_bytes(bytes(data))
    return damage


def replace_with_folder(name: str) -> Callable[[Path], None]:
    def damage(exp: Path) -> None:
        (exp / name).unlink()
        (exp / name).mkdir()
    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda exp: (exp / name).unlink()


def break_json_key(name: str) -> Callable[[Path], None]:
    """Drop the quote that opens the first key: ``Expecting property name enclosed in double quotes``."""
    def damage(exp: Path) -> None:
        text = (exp / name).read_text()
        i = text.index('"')
        (exp / name).write_text(text[:i] + text[i + 1:])
    return damage


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

Argv = Callable[[Workspace], list[str]]
#: Text the output must contain, given the workspace (file names, values).
Needles = Callable[[Workspace], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Argv
    needles: Needles = lambda w: []
    code: int = 2


def _exp_cases(command: str, *extra: str) -> list[Case]:
    """Damaged results files for a command reading one experiment (``report``, ``export``)."""
    e = [command]
    return [
        Case(f"{command}-missing-folder", lambda w: [*e, str(w.missing), *extra], lambda w: [str(w.missing)]),
        Case(f"{command}-file-not-folder", lambda w: [*e, str(w.blocker), *extra], lambda w: [str(w.blocker)]),
        Case(f"{command}-trials-truncated", lambda w: [*e, str(w.exp(truncate("trials.parquet"))), *extra],
             lambda w: ["trials.parquet"]),
        Case(f"{command}-trials-page-header-flipped",
             lambda w: [*e, str(w.exp(flip("trials.parquet", 4))), *extra], lambda w: ["trials.parquet"]),
        Case(f"{command}-trials-footer-flipped",
             lambda w: [*e, str(w.exp(flip("trials.parquet", -40, 32))), *extra], lambda w: ["trials.parquet"]),
        Case(f"{command}-trials-is-a-folder",
             lambda w: [*e, str(w.exp(replace_with_folder("trials.parquet"))), *extra], lambda w: ["trials.parquet"]),
        Case(f"{command}-experiment-json-truncated",
             lambda w: [*e, str(w.exp(truncate("experiment.json"))), *extra], lambda w: ["experiment.json"]),
        Case(f"{command}-experiment-json-bad-key",
             lambda w: [*e, str(w.exp(break_json_key("experiment.json"))), *extra], lambda w: ["experiment.json"]),
        Case(f"{command}-experiment-json-missing",
             lambda w: [*e, str(w.exp(remove("experiment.json"))), *extra], lambda w: ["experiment.json"]),
        Case(f"{command}-out-under-a-file",
             lambda w: [*e, str(w.exp()), *extra, "--out",
                        str(w.blocker / ("r" if command == "report" else "best.yaml"))],
             lambda w: [str(w.blocker)]),
        Case(f"{command}-out-under-proc", lambda w: [*e, str(w.exp()), *extra, "--out", f"{PROC_TARGET}/x"],
             lambda w: ["/proc/version"]),
    ]


CASES: list[Case] = [
    # ---- config -----------------------------------------------------------------------------------
    Case("config-show-missing-yaml", lambda w: ["config", "show", str(w.missing / "c.yaml")],
         lambda w: [str(w.missing / "c.yaml")]),
    Case("config-show-folder", lambda w: ["config", "show", str(w.folder("cfgdir"))], lambda w: ["cfgdir"]),
    Case("config-show-broken-yaml", lambda w: ["config", "show", str(w.file("bad.yaml", "eps: [1, 2\nrw: {"))],
         lambda w: ["bad.yaml"]),
    Case("config-show-binary-yaml", lambda w: ["config", "show", str(w.file("bin.yaml", b"\xff\xfe\x00garbage"))],
         lambda w: ["bin.yaml"]),
    Case("config-show-not-a-mapping", lambda w: ["config", "show", str(w.file("list.yaml", "- 1\n- 2\n"))],
         lambda w: ["list.yaml"]),
    Case("config-show-set-bad-float", lambda w: ["config", "show", "synth", "--set", "eps.tau=abc"],
         lambda w: ["eps.tau", "abc"]),
    Case("config-show-set-unknown-key", lambda w: ["config", "show", "synth", "--set", "eps.nope=1"],
         lambda w: ["eps.nope"]),
    Case("config-show-set-no-equals", lambda w: ["config", "show", "synth", "--set", "eps.tau"],
         lambda w: ["eps.tau"]),
    Case("config-show-set-empty-key", lambda w: ["config", "show", "synth", "--set", "=1"]),
    Case("config-show-set-bad-int", lambda w: ["config", "show", "synth", "--set", "eps.iterations=1.5"],
         lambda w: ["eps.iterations"]),
    # ---- data -------------------------------------------------------------------------------------
    Case("data-synth-under-a-file", lambda w: ["data", "synth", str(w.blocker / "ds"), "--preset", "tiny"],
         lambda w: [str(w.blocker)]),
    Case("data-synth-under-proc", lambda w: ["data", "synth", PROC_TARGET, "--preset", "tiny"],
         lambda w: ["/proc/version"]),
    Case("data-synth-bad-preset", lambda w: ["data", "synth", str(w.tmp / "ds"), "--preset", "huge"],
         lambda w: ["huge"]),
    Case("data-synth-bad-size", lambda w: ["data", "synth", str(w.tmp / "ds"), "--image-size", "0"],
         lambda w: ["image_size"]),
    Case("data-check-missing-root", lambda w: ["data", "check", str(w.missing)], lambda w: [str(w.missing)], code=1),
    Case("data-check-file-root", lambda w: ["data", "check", str(w.blocker)], lambda w: [str(w.blocker)], code=1),
    Case("data-check-bad-label-source", lambda w: ["data", "check", str(w.synth_root), "--label-source", "psychic"],
         lambda w: ["psychic"]),
    Case("data-prepare-voc-missing-archive",
         lambda w: ["data", "prepare-voc", "--voc", str(w.missing / "voc.tar"), "--out", str(w.tmp / "voc")],
         lambda w: [str(w.missing / "voc.tar")]),
    Case("data-prepare-voc-corrupt-archive",
         lambda w: ["data", "prepare-voc", "--voc", str(w.file("voc.tar", b"\0" * 100 + b"not a tar")),
                    "--out", str(w.tmp / "voc"), "--no-progress"], lambda w: ["voc.tar"]),
    # ---- run, preflight, doctor ---------------------------------------------------------------------
    Case("run-missing-config", lambda w: ["run", str(w.missing / "c.yaml")], lambda w: [str(w.missing / "c.yaml")]),
    Case("run-broken-yaml", lambda w: ["run", str(w.file("bad.yaml", "eps: [1, 2\n"))], lambda w: ["bad.yaml"]),
    Case("run-bad-set", lambda w: ["run", "synth", "--set", "rw.beta=many"], lambda w: ["rw.beta", "many"]),
    Case("run-bad-stages", lambda w: ["run", "synth", "--stages", "eps,segment"], lambda w: ["segment"]),
    Case("run-missing-data", lambda w: ["run", "synth", "--data", str(w.missing), "--out", str(w.tmp / "run")],
         lambda w: [str(w.missing)]),
    Case("run-out-under-a-file",
         lambda w: ["run", "synth", "--data", str(w.synth_root), "--stages", "eps", "--out", str(w.blocker / "run")],
         lambda w: [str(w.blocker)]),
    Case("preflight-missing-config", lambda w: ["preflight", str(w.missing / "c.yaml")],
         lambda w: [str(w.missing / "c.yaml")]),
    Case("preflight-bad-set", lambda w: ["preflight", "synth", "--set", "eps.tau=abc"], lambda w: ["eps.tau"]),
    Case("preflight-finds-missing-data", lambda w: ["preflight", "synth", "--data", str(w.missing)],
         lambda w: [str(w.missing)], code=1),
    Case("preflight-finds-unwritable-out",
         lambda w: ["preflight", "synth", "--data", str(w.synth_root), "--stages", "eps",
                    "--out", str(w.blocker / "o")], lambda w: [str(w.blocker)], code=1),
    Case("doctor-bad-set", lambda w: ["doctor", "--config", "synth", "--data", str(w.synth_root),
                                      "--set", "eps.tau=abc"], lambda w: ["eps.tau"], code=1),
    # ---- weights ------------------------------------------------------------------------------------
    Case("weights-inspect-missing", lambda w: ["weights", "inspect", str(w.missing / "w.pth")],
         lambda w: [str(w.missing / "w.pth")]),
    Case("weights-inspect-folder", lambda w: ["weights", "inspect", str(w.folder("w.pth"))], lambda w: ["w.pth"]),
    Case("weights-inspect-truncated", lambda w: ["weights", "inspect", str(w.file("w.pth", b"PK\x03\x04 truncated"))],
         lambda w: ["w.pth"]),
    Case("weights-inspect-garbage-params", lambda w: ["weights", "inspect", str(w.file("w.params", b"\x12\x01" * 50))],
         lambda w: ["w.params"]),
    # ---- report, export, compare --------------------------------------------------------------------
    *_exp_cases("report", "--images", "0"),
    Case("report-reports-truncated", lambda w: ["report", str(w.exp(truncate("reports.parquet"))), "--images", "0"],
         lambda w: ["reports.parquet"]),
    Case("report-optuna-db-not-a-database",
         lambda w: ["report", str(w.exp(overwrite("optuna.db", 0, b"garbage garbage!"))), "--images", "0"],
         lambda w: ["optuna.db"]),
    Case("report-optuna-db-truncated",
         lambda w: ["report", str(w.exp(truncate("optuna.db", 0.3))), "--images", "0"], lambda w: ["optuna.db"]),
    Case("report-bad-wandb", lambda w: ["report", str(w.exp()), "--wandb", "sometimes"], lambda w: ["sometimes"]),
    Case("report-negative-images", lambda w: ["report", str(w.exp()), "--images", "-1"], lambda w: ["--images"]),
    *_exp_cases("export", "--allow-incomplete"),
    Case("export-out-is-a-folder", lambda w: ["export", str(w.exp()), "--allow-incomplete", "--out",
                                              str(w.folder("outdir"))], lambda w: [f"{w.tmp / 'outdir'}: "]),
    Case("export-incomplete", lambda w: ["export", str(w.exp())], lambda w: ["incomplete"]),
    Case("compare-missing", lambda w: ["compare", str(w.missing), str(w.exp())], lambda w: [str(w.missing)]),
    Case("compare-trials-flipped", lambda w: ["compare", str(w.pristine), str(w.exp(flip("trials.parquet", 4)))],
         lambda w: ["trials.parquet"]),
    Case("compare-experiment-json-truncated",
         lambda w: ["compare", str(w.exp(truncate("experiment.json"))), str(w.pristine)],
         lambda w: ["experiment.json"]),
    Case("compare-out-under-a-file",
         lambda w: ["compare", str(w.pristine), str(w.pristine), "--out", str(w.blocker / "c.md")],
         lambda w: [str(w.blocker)]),
    Case("compare-out-is-a-folder",
         lambda w: ["compare", str(w.pristine), str(w.pristine), "--out", str(w.folder("outdir"))],
         lambda w: [f"{w.tmp / 'outdir'}: "]),
    Case("compare-out-under-proc", lambda w: ["compare", str(w.pristine), str(w.pristine), "--out", PROC_TARGET],
         lambda w: ["/proc/version"]),
    # ---- plan, sweep, resume, demo (all fail before Ray starts) --------------------------------------
    Case("plan-missing-space", lambda w: ["plan", str(w.missing / "s.yaml")], lambda w: [str(w.missing / "s.yaml")]),
    Case("plan-broken-space", lambda w: ["plan", str(w.file("s.yaml", "params: {eps.tau: [\n"))],
         lambda w: ["s.yaml"]),
    Case("plan-missing-data", lambda w: ["plan", "synth_rw", "--data", str(w.missing)], lambda w: [str(w.missing)]),
    Case("sweep-missing-space", lambda w: ["sweep", str(w.missing / "s.yaml"), "--storage", str(w.tmp / "e")],
         lambda w: [str(w.missing / "s.yaml")]),
    Case("sweep-space-is-a-folder", lambda w: ["sweep", str(w.folder("space.yaml")), "--storage", str(w.tmp / "e")],
         lambda w: ["space.yaml"]),
    Case("sweep-broken-space", lambda w: ["sweep", str(w.file("s.yaml", "base: synth\nparams: [\n")),
                                          "--storage", str(w.tmp / "e")], lambda w: ["s.yaml"]),
    Case("sweep-bad-set", lambda w: ["sweep", "synth_rw", "--data", str(w.synth_root), "--storage", str(w.tmp / "e"),
                                     "--set", "rw.alpha=lots", "--wandb", "off"], lambda w: ["rw.alpha"]),
    Case("sweep-missing-data", lambda w: ["sweep", "synth_rw", "--data", str(w.missing),
                                          "--storage", str(w.tmp / "e"), "--wandb", "off"],
         lambda w: [str(w.missing)]),
    Case("sweep-storage-under-a-file", lambda w: ["sweep", "synth_rw", "--data", str(w.synth_root),
                                                  "--storage", str(w.blocker / "e"), "--wandb", "off"],
         lambda w: [str(w.blocker)]),
    Case("sweep-bad-wandb", lambda w: ["sweep", "synth_rw", "--data", str(w.synth_root),
                                       "--storage", str(w.tmp / "e"), "--wandb", "sometimes"],
         lambda w: ["sometimes"]),
    Case("sweep-bad-mode", lambda w: ["sweep", "synth_gap", "--data", str(w.synth_root), "--storage", str(w.tmp / "e"),
                                      "--wandb", "off", "--mode", "stagewise"], lambda w: ["--mode", "stagewise"]),
    Case("sweep-bad-stage-budget", lambda w: ["sweep", "synth_gap", "--data", str(w.synth_root), "--mode", "cascade",
                                              "--storage", str(w.tmp / "e"), "--wandb", "off",
                                              "--stage-budget", "eps=lots"], lambda w: ["--stage-budget", "eps=lots"]),
    Case("sweep-budget-of-no-stage", lambda w: ["sweep", "synth_gap", "--data", str(w.synth_root), "--mode", "cascade",
                                                "--storage", str(w.tmp / "e"), "--wandb", "off",
                                                "--stage-budget", "walk=3"], lambda w: ["walk"]),
    Case("sweep-budget-in-a-joint-search", lambda w: ["sweep", "synth_gap", "--data", str(w.synth_root),
                                                      "--storage", str(w.tmp / "e"), "--wandb", "off",
                                                      "--stage-budget", "eps=3"], lambda w: ["--mode cascade"]),
    Case("sweep-negative-reseed", lambda w: ["sweep", "synth_gap", "--data", str(w.synth_root),
                                             "--storage", str(w.tmp / "e"), "--wandb", "off",
                                             "--reseed-seeds", "-1"], lambda w: ["--reseed-seeds"]),
    Case("sweep-missing-compare-config", lambda w: ["sweep", "synth_gap", "--data", str(w.synth_root),
                                                    "--storage", str(w.tmp / "e"), "--wandb", "off",
                                                    "--compare-config", str(w.missing / "c.yaml")],
         lambda w: [str(w.missing / "c.yaml")]),
    Case("resume-missing", lambda w: ["resume", str(w.missing)], lambda w: [str(w.missing)]),
    Case("resume-file", lambda w: ["resume", str(w.blocker)], lambda w: [str(w.blocker)]),
    Case("resume-not-a-sweep-folder", lambda w: ["resume", str(w.exp())], lambda w: [str(w.tmp / "exp")]),
    Case("resume-sweep-json-truncated",
         lambda w: ["resume", str(w.exp(lambda e: (e / "sweep.json").write_text('{"name": "exp-a", "wandb":')))],
         lambda w: ["sweep.json"]),
    Case("demo-data-is-a-file", lambda w: ["demo", "--data", str(w.blocker), "--storage", str(w.tmp / "e"),
                                           "--wandb", "off"], lambda w: [str(w.blocker)]),
    Case("demo-no-trials", lambda w: ["demo", "--data", str(w.synth_root), "--storage", str(w.tmp / "e"),
                                      "--trials", "0", "--wandb", "off"], lambda w: ["trials"]),
    # ---- cache, ray-clean ---------------------------------------------------------------------------
    Case("cache-ls-missing-store", lambda w: ["cache", "ls", str(w.missing)], lambda w: [str(w.missing)]),
    Case("cache-ls-file-store", lambda w: ["cache", "ls", str(w.blocker)], lambda w: [str(w.blocker)]),
    Case("cache-ls-bad-stage", lambda w: ["cache", "ls", str(w.folder("store")), "--stage", "../eps"],
         lambda w: ["../eps"]),
    Case("cache-gc-missing-store", lambda w: ["cache", "gc", str(w.missing), "--dry-run"], lambda w: [str(w.missing)]),
    Case("cache-gc-bad-age", lambda w: ["cache", "gc", str(w.folder("store")), "--older-than", "soon"],
         lambda w: ["soon"]),
    Case("cache-gc-nan-age", lambda w: ["cache", "gc", str(w.folder("store")), "--older-than", "nan"],
         lambda w: ["nan"]),
    Case("ray-clean-missing", lambda w: ["ray-clean", str(w.missing)], lambda w: [str(w.missing)]),
    Case("ray-clean-no-record", lambda w: ["ray-clean", str(w.exp())], lambda w: ["ray_session.json"]),
    Case("ray-clean-record-truncated",
         lambda w: ["ray-clean", str(w.exp(lambda e: (e / "ray_session.json").write_text('{"session_name": "s')))],
         lambda w: ["ray_session.json"]),
    Case("ray-clean-negative-grace", lambda w: ["ray-clean", str(w.exp()), "--grace", "-1"], lambda w: ["--grace -1"]),
]

#: The commands the table drives (``config list`` takes no input); a command added later is at least
#: driven by :func:`test_every_command_refuses_a_path_under_a_file` until it has cases here.
COMMANDS = {"config show", "data synth", "data check", "data prepare-voc", "run", "preflight", "doctor",
            "weights inspect", "report", "export", "compare", "plan", "sweep", "resume", "demo", "cache ls",
            "cache gc", "ray-clean"}


def _cli_commands() -> list[str]:
    """Every command of the CLI, as typed (``cache ls``)."""
    import typer.main

    def walk(cmd: object, prefix: str) -> list[str]:
        if hasattr(cmd, "commands"):
            return [n for name, sub in sorted(cmd.commands.items()) for n in walk(sub, f"{prefix} {name}".strip())]
        return [prefix]

    return walk(typer.main.get_command(app), "")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    return make_experiment(tmp_path_factory.mktemp("errors") / "exp-a", synth_root)


def test_the_table_drives_every_command() -> None:
    """Each command of COMMANDS exists and has cases (named ``<command>-...``); case names are unique."""
    assert COMMANDS <= set(_cli_commands())
    covered = {c for c in COMMANDS for case in CASES if case.id.startswith(c.replace(" ", "-") + "-")}
    assert covered == COMMANDS, sorted(COMMANDS - covered)
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command", _cli_commands())
def test_every_command_refuses_a_path_under_a_file(command: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command, given as its argument a path under a regular file (a missing input, an
    unwritable output; or an argument it does not take), exits non-zero without a traceback."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file\n")
    res = CliRunner().invoke(app, [*command.split(), str(tmp_path / "blocker" / "thing")])
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"{type(res.exception).__name__}: {res.exception}\n{res.output}")
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_error_line_and_no_traceback(case: Case, experiment: Path, synth_root: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit code as in the table (2: expected failure, 1: a check's finding), no exception escaping
    the command, no traceback, and the output names the file or value."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)  # anything written to a default relative folder stays in the tmp folder
    w = Workspace(tmp_path, experiment, synth_root)
    res = CliRunner().invoke(app, case.argv(w))
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"{type(res.exception).__name__}: {res.exception}\n{res.output}")
    assert res.exit_code == case.code, res.output
    assert "Traceback" not in res.output
    if case.code == 2:
        assert res.stderr.lstrip().startswith("error: "), res.output
    for needle in case.needles(w):
        assert needle in res.output, f"{needle!r} not in:\n{res.output}"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only expected failures are mapped: an unexpected exception (here a KeyError raised inside
    ``config show``) leaves the command as it is, so the console shows its traceback."""
    import wsss_tune.config

    def broken(*args: object, **kwargs: object) -> str:
        raise KeyError("a bug")

    monkeypatch.setattr(wsss_tune.config, "dump_yaml", broken)
    res = CliRunner().invoke(app, ["config", "show", "synth"])
    assert isinstance(res.exception, KeyError) and res.exit_code == 1
    assert "error:" not in res.output


def test_parse_errors_without_a_file_name_are_traced_to_the_declared_file(tmp_path: Path) -> None:
    """A JSON, YAML, parquet or SQLite error whose message names no file is matched to the declared
    input of that format that fails to read: the message names it, says what it is and what to do.
    Inputs that read fine, or of another format, are not blamed; with no damaged input the message
    lists the candidates."""
    import json
    import sqlite3

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from wsss_tune.cli import _expected_failure, _Input

    good_json, bad_json = tmp_path / "good.json", tmp_path / "bad.json"
    good_json.write_text('{"a": 1}')
    bad_json.write_text('{"a": 1')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(b"a: [1,\n")
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "t.parquet")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes((tmp_path / "t.parquet").read_bytes()[:-12])
    bad_db = tmp_path / "bad.db"
    bad_db.write_bytes(b"not a database at all" * 10)
    inputs = [_Input(str(good_json), "json", "good record", "nothing to do"),
              _Input(str(tmp_path / "*.json"), "json", "record", "fix the JSON"),
              _Input(str(bad_yaml), "yaml", "config file", "fix the YAML"),
              _Input(str(tmp_path / "t.parquet"), "parquet", "table", "rebuild it"),
              _Input(str(bad_parquet), "parquet", "table", "rebuild it"),
              _Input(str(bad_db), "sqlite", "study", "restore it")]

    def raised(fn):  # noqa: ANN001, ANN202 - the exception ``fn`` raises
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            return exc
        raise AssertionError("expected an exception")

    msg = _expected_failure(raised(lambda: json.loads(bad_json.read_text())), inputs)
    assert msg == f"{bad_json}: the record is unreadable (JSONDecodeError: Expecting ',' delimiter: line 1 " \
                  "column 8 (char 7)); fix the JSON"
    msg = _expected_failure(raised(lambda: yaml.safe_load(bad_yaml.read_text())), inputs)
    assert msg.startswith(f"{bad_yaml}: the config file is unreadable (") and msg.endswith("; fix the YAML")
    msg = _expected_failure(raised(lambda: pq.read_table(bad_parquet)), inputs)
    assert msg.startswith(f"{bad_parquet}: the table is unreadable (") and "t.parquet:" not in msg
    msg = _expected_failure(raised(lambda: sqlite3.connect(bad_db).execute("select 1 from x").fetchall()), inputs)
    assert msg == f"{bad_db}: the study is unreadable (DatabaseError: file is not a database); restore it"
    bad_json.write_text('{"a": 1}')
    msg = _expected_failure(json.JSONDecodeError("Expecting value", "x", 0), inputs)
    assert msg.startswith("a file this command reads is unreadable (JSONDecodeError: Expecting value")
    assert str(good_json) in msg and str(tmp_path / "*.json") in msg
