"""The command line: help lists the subcommands; bad arguments give one clear line and exit code 2."""

import subprocess
import sys

import pytest

from mmlite.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mmlite", "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "bench", "book"):
        assert command in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["data", "--seed", "-1"], "non-negative integer"),
    (["data", "--preset", "huge"], "invalid choice"),
    (["data", "--image-size", "0"], "positive integer"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_chapter_is_a_clear_error(capsys):
    assert main(["book", "--check", "98"]) == 2
    assert "no chapter 98" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "tpu"], "--device must be cpu, cuda or mps, got 'tpu'"),
    (["bench", "--out", ""], "--out is empty"),
    (["bench", "--out", "{file}/bench.json"], "is a file, so nothing can be created below it"),
    (["bench", "--out", "{dir}"], "is an existing folder, not a file"),
])
def test_bench_refuses_bad_device_and_output_before_timing(argv, message, tmp_path, monkeypatch, capsys):
    from mmlite import bench

    def refuse(*_, **__):
        raise AssertionError("timed before checking the arguments")

    monkeypatch.setattr(bench, "benchmark", refuse)
    (tmp_path / "FILE").write_text("x")
    argv = [a.format(file=tmp_path / "FILE", dir=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_os_errors_become_one_line_with_exit_code_1(monkeypatch, capsys):
    from mmlite import book

    def denied(args):
        raise PermissionError(13, "Permission denied", "chapters/01_background.ipynb")

    monkeypatch.setattr(book, "run", denied)
    assert main(["book", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "Traceback" not in err
