"""The chapter pipeline: every chapter is a jupytext pair in sync, committed with executed outputs."""

import json
from pathlib import Path

import pytest

from mmlite.book import CHAPTERS_DIR, chapter_sources, pair_differences

SOURCES = chapter_sources()


def test_chapters_exist():
    assert SOURCES, f"no chapters found in {CHAPTERS_DIR}"
    numbers = [int(p.name[:2]) for p in SOURCES]
    assert numbers == sorted(set(numbers)), "chapter numbers must be unique"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync(py: Path):
    assert pair_differences(py) == []


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebook_executed_without_errors(py: Path):
    """A notebook committed without outputs would pass nbval while checking nothing."""
    nb = json.loads(py.with_suffix(".ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, "a chapter without code cells"
    unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unrun, f"code cells {unrun} have no stored execution: run `python -m mmlite book {py.name[:2]}`"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "cells were not executed top to bottom in one fresh kernel"
    errors = [i for i, c in enumerate(code) for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"stored outputs hold errors in code cells {errors}"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_chapter_anatomy(py: Path):
    """Title cell says the seed section and run time; the chapter ends with Summary and Exercises."""
    text = py.read_text()
    assert "Seed section" in text.split("# %%")[1], "the title cell names the seed section it mirrors"
    assert "Run time" in text.split("# %%")[1], "the title cell states the expected run time"
    assert "## Summary" in text and "## Exercises" in text
    assert "mmlite.utils" in text or "from mmlite import utils" in text, "chapters call mmlite.utils.setup()"


def test_pair_check_detects_a_difference(tmp_path: Path):
    import jupytext

    py = tmp_path / "01_x.py"
    py.write_text("# %%\nx = 1\n")
    jupytext.write(jupytext.read(py), tmp_path / "01_x.ipynb")
    assert pair_differences(py) == []
    py.write_text("# %%\nx = 2\n")
    assert pair_differences(py) and "cell 0" in pair_differences(py)[0]


def test_chapter_selector_errors():
    with pytest.raises(ValueError, match="no chapter 98"):
        chapter_sources(["98"])
    with pytest.raises(ValueError, match="neither a chapter number"):
        chapter_sources(["intro"])
