"""The installed `cachebrew` console script, run as a user runs it: a mistake on the command line or in a config
is one `error: ...` line on stderr and exit status 2, never a traceback or a box-drawn usage panel; with the typer
that pip installs and with the oldest one pyproject.toml allows (typer 0.9 on click 8.1)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("cachebrew")
OLDEST_TYPER = ["typer==0.9.0", "click==8.1.7"]  # pyproject: typer>=0.9
BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters: rich's panels

BAD_CONFIG = "output_dir: runs/x\nmodel: {path: m}\ndata: {path: d.csv, text: t}\ntrain: {epochs: -1}\n"


def _bad_invocations(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """{what: (argv, a phrase the error line must hold)}"""
    (tmp / "bad.yaml").write_text(BAD_CONFIG)
    (tmp / "broken.yaml").write_text("output_dir: [unclosed\n")
    return {
        "unknown command": (["exprot"], "Did you mean 'export'?"),
        "unknown command, no hint": (["frobnicate"], "No such command 'frobnicate'"),
        "missing argument": (["export"], "Missing argument"),
        "missing second argument": (["pull", "s3://bucket/cache"], "Missing argument"),
        "bad integer": (["inspect", "cache", "--rows", "abc"], "'--rows'"),
        "bad integer, evaluate": (["evaluate", "m", "d.csv", "--max-length", "x"], "'--max-length'"),
        "unknown option": (["export", "--bogus", "x.yaml"], "No such option: --bogus"),
        "unknown top-level option": (["--verbose"], "No such option: --verbose"),
        "flag given a value": (["train", "x.yaml", "--progress=3"], "'--progress'"),
        "extra argument": (["verify", "a", "b"], "unexpected extra argument"),
        "config file not found": (["distill", str(tmp / "nothere.yaml")], "nothere.yaml"),
        "config with a bad field": (["train", str(tmp / "bad.yaml")], "train.epochs"),
        "config that is not YAML": (["validate", str(tmp / "broken.yaml")], "broken.yaml"),
        "unknown config extension": (["validate", str(tmp / "config.txt")], "config.txt"),
        "bad --set": (["train", str(tmp / "bad.yaml"), "--set", "novalue"], "novalue"),
        "bad --kind": (["validate", str(tmp / "bad.yaml"), "--kind", "nonsense"], "--kind"),
    }


@pytest.fixture(scope="module")
def oldest_typer(tmp_path_factory):
    """A folder holding the oldest typer (and a click it runs on), put first on PYTHONPATH by the test."""
    target = tmp_path_factory.mktemp("oldest-typer")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          *OLDEST_TYPER], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        if "No matching distribution" in res.stderr or "network" in res.stderr.lower():
            pytest.skip(f"cannot install {OLDEST_TYPER} (no package index): {res.stderr.strip()[-200:]}")
        raise AssertionError(res.stderr)
    return target


def _run(argv, cwd, pythonpath=None):
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(SCRIPT), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("typer_version", ["installed", "oldest allowed"])
def test_every_bad_invocation_is_one_error_line_and_exit_2(tmp_path, typer_version, request):
    assert SCRIPT.is_file(), f"the console script is not installed next to {sys.executable} (pip install -e .)"
    path = request.getfixturevalue("oldest_typer") if typer_version == "oldest allowed" else None
    cases = _bad_invocations(tmp_path)
    assert len(cases) >= 10
    for what, (argv, phrase) in cases.items():
        res = _run(argv, tmp_path, path)
        lines = res.stderr.splitlines()
        where = f"{what}: cachebrew {' '.join(argv)} -> rc {res.returncode}\nstderr:\n{res.stderr}\nstdout:\n{res.stdout}"
        assert res.returncode == 2, where
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert phrase in lines[0], where
        assert "Traceback" not in res.stderr + res.stdout and not BOX.search(res.stderr), where
        assert res.stdout == "", where


@pytest.mark.parametrize("typer_version", ["installed", "oldest allowed"])
def test_version_help_and_workflow_order(tmp_path, typer_version, request):
    path = request.getfixturevalue("oldest_typer") if typer_version == "oldest allowed" else None
    from cachebrew.version import __version__

    for argv in (["--version"], ["version"]):
        res = _run(argv, tmp_path, path)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert res.stdout.startswith(f"cachebrew {__version__} (torch "), res.stdout
    for argv in ([], ["--help"]):  # no arguments: the help, not an error
        res = _run(argv, tmp_path, path)
        assert res.returncode == 0, res.stderr
        order = ["export", "inspect", "verify", "distill", "evaluate", "train", "push", "pull", "ls", "pack",
                 "unpack", "validate", "version"]
        listed = [m.group(1) for m in re.finditer(r"^[\s\u2502|]*(\w+)\s{2,}\S", res.stdout, re.M) if m.group(1) in order]
        assert listed == order, res.stdout
        assert "Examples:" in res.stdout and "cachebrew distill distill.yaml" in res.stdout
    res = _run(["train", "--help"], tmp_path, path)
    assert "--no-progress" in res.stdout and "--no-no-progress" not in res.stdout
    res = _run(["evaluate", "--help"], tmp_path, path)
    for option in ("--device", "--max-length", "--label", "--output"):  # every option has help text
        line = next(ln for ln in res.stdout.splitlines() if option in ln)
        assert len(re.sub(r"[\s\u2500-\u257f]", "", line.split(option, 1)[1])) > 10, res.stdout


def test_main_in_process_matches_the_script(capsys):
    """cachebrew.cli.main (what `python -m cachebrew` calls) exits 2 with the same line."""
    from cachebrew.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["exprot"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: No such command 'exprot'. Did you mean 'export'? (see 'cachebrew --help')\n"
