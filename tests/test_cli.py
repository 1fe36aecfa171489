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
