"""`python -m mmlite data`: identical bytes from the same seed, the files it writes, clear errors."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from mmlite.cli import main
from mmlite.data import SPLITS, describe, read_world


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The tiny preset written twice with seed 0, into two folders; plus the printed summary."""
    root = tmp_path_factory.mktemp("runs")
    outputs = []
    for name in ("a", "b"):
        buf = io.StringIO()  # capsys is function-scoped, so capture by hand
        with contextlib.redirect_stdout(buf):
            assert main(["data", "--preset", "tiny", "--seed", "0", "--out", str(root / name)]) == 0
        outputs.append(buf.getvalue())
    return root, outputs


def test_same_seed_writes_identical_files(two_runs):
    root, _ = two_runs
    files = sorted(p.relative_to(root / "a") for p in (root / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"meta.json", "stats.json", "samples.png", "train/images.npy",
                                        "comp/text.json"}
    assert len(files) == 3 + 3 * len(SPLITS)
    for f in files:
        assert (root / "a" / f).read_bytes() == (root / "b" / f).read_bytes(), f"{f} differs between runs"


def test_written_world_stats_and_grid(two_runs):
    root, outputs = two_runs
    world = read_world(root / "a")
    assert [len(world[s]) for s in SPLITS] == [2000, 500, 500, 500]
    stats = json.loads((root / "a" / "stats.json").read_text())
    assert stats == {s: describe(world[s]) for s in SPLITS}
    png = (root / "a" / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in png
    summary = outputs[0]
    for needle in ("train 2000, val 500, test 500, comp 500", "vocabulary 59 words", "21 answers", "images/s",
                   str(root / "a")):
        assert needle in summary


def test_other_seed_and_image_size(two_runs, tmp_path):
    root, _ = two_runs
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "--seed", "1", "--image-size", "16", "--out", str(tmp_path / "s1")]) == 0
    s1, s0 = read_world(tmp_path / "s1"), read_world(root / "a")
    assert s1["train"].images.shape == (2000, 16, 16, 3) and s0["train"].images.shape == (2000, 32, 32, 3)
    assert s1["train"].captions != s0["train"].captions
    assert not np.array_equal(s1["val"].objects, s0["val"].objects)


@pytest.mark.parametrize("argv, message", [
    (["data", "--seed", "-1"], "non-negative integer"),
    (["data", "--preset", "huge"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_values_are_one_clear_line(tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("not a folder")
    assert main(["data", "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an existing file" in err and str(existing) in err
    assert main(["data", "--image-size", "8", "--out", str(tmp_path / "x")]) == 2
    assert "--image-size" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["data", "--out", str(tmp_path / "full")]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_command_line_process_exit_code(tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "mmlite", "data", "--out", str(existing)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "is an existing file" in proc.stderr and "Traceback" not in proc.stderr


def _no_generation(monkeypatch):
    """Make generating a world fail loudly: a bad --out must be refused before any work."""
    from mmlite.data import command

    def refuse(*_, **__):
        raise AssertionError("the world was generated before --out was checked")

    monkeypatch.setattr(command, "generate", refuse)


@pytest.mark.parametrize("out, message", [
    ("{file}/sub", "is a file, so nothing can be created below it"),
    ("{file}/a/b", "is a file, so nothing can be created below it"),
    ("", "--out is empty"),
    ("  ", "--out is empty"),
    ("..", "must end in a folder name"),
])
def test_bad_output_locations_are_refused_first_in_one_line(out, message, tmp_path, monkeypatch, capsys):
    _no_generation(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    assert main(["data", "--out", out.format(file="FILE")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"], "no ..old.* or temporary folder is left"


def test_os_errors_while_writing_are_one_line(tmp_path, monkeypatch, capsys):
    from mmlite.data import command

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    from mmlite.data import DataConfig

    monkeypatch.setitem(command.PRESETS, "tiny", DataConfig(n_train=4, n_val=2, n_test=2, n_comp=2))  # fast
    monkeypatch.setattr(command, "save_world", disk_full)
    assert main(["data", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not write the world" in err and "No space left on device" in err


def test_empty_out_in_an_empty_folder_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from mmlite.data import DataConfig, command

    monkeypatch.setitem(command.PRESETS, "tiny", DataConfig(n_train=4, n_val=2, n_test=2, n_comp=2))  # fast
    monkeypatch.chdir(tmp_path)  # "" is the current folder, which a world cannot replace
    assert main(["data", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no ..old.* or temporary folder is left"


def test_default_out_is_where_load_looks_whatever_the_current_folder(tmp_path, monkeypatch, capsys):
    """Run from another folder (as from chapters/), the command writes the world that load() then reads."""
    from mmlite.data import DataConfig, cache, command, load, world_folder

    monkeypatch.setitem(command.PRESETS, "tiny", DataConfig(n_train=4, n_val=2, n_test=2, n_comp=2))  # fast
    monkeypatch.setenv("MMLITE_DATA", str(tmp_path / "store"))
    elsewhere = tmp_path / "chapters"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["data", "--preset", "tiny", "--seed", "3"]) == 0
    assert world_folder("tiny", 3) == tmp_path / "store" / "tiny-seed3"
    assert (tmp_path / "store" / "tiny-seed3" / "meta.json").is_file()
    assert list(elsewhere.iterdir()) == [], "nothing is written under the current folder"

    def refuse(*_, **__):
        raise AssertionError("load() generated the world again instead of finding the command's")

    monkeypatch.setattr(cache, "generate", refuse)
    world = load("tiny", seed=3)
    assert [len(world[s]) for s in SPLITS] == [4, 2, 2, 2]
    assert "tiny-seed3" in capsys.readouterr().out
