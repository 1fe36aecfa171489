"""The book's build tool: keep chapter pairs (.py <-> .ipynb) in sync and re-execute them in place."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CHAPTERS_DIR = Path(__file__).resolve().parents[1] / "chapters"


def chapter_sources(selectors: list[str] | None = None, root: Path = CHAPTERS_DIR) -> list[Path]:
    """The chapters' .py sources, all of them or those named by number ("1", "04") or path."""
    sources = sorted(p for p in root.glob("[0-9][0-9]_*.py"))
    if not selectors:
        return sources
    chosen = []
    for sel in selectors:
        path = Path(sel)
        if path.suffix in (".py", ".ipynb") and path.exists():
            chosen.append(path.with_suffix(".py").resolve())
            continue
        if not sel.isdigit():
            raise ValueError(f"chapter {sel!r} is neither a chapter number nor an existing .py/.ipynb path")
        matches = [p for p in sources if p.name.startswith(f"{int(sel):02d}_")]
        if not matches:
            raise ValueError(f"no chapter {int(sel):02d} in {root} (have: {', '.join(p.stem for p in sources)})")
        chosen.extend(matches)
    return chosen


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def pair_differences(py_path: Path) -> list[str]:
    """Cells where the .py source and its .ipynb twin disagree (empty list when the pair is in sync)."""
    import jupytext
    import nbformat

    nb_path = py_path.with_suffix(".ipynb")
    if not nb_path.exists():
        return [f"{nb_path.name} is missing"]
    from_py = _cells(jupytext.read(py_path))
    from_nb = _cells(nbformat.read(nb_path, as_version=4))
    problems = []
    if len(from_py) != len(from_nb):
        problems.append(f"{py_path.name} has {len(from_py)} cells, {nb_path.name} has {len(from_nb)}")
    for i, (a, b) in enumerate(zip(from_py, from_nb)):
        if a != b:
            problems.append(f"cell {i}: {a[0]} {a[1][:60]!r} in .py vs {b[0]} {b[1][:60]!r} in .ipynb")
    return problems


def _clean(nb) -> None:
    """Drop what changes from machine to machine: timings, versions, random cell ids."""
    nb.metadata.pop("widgets", None)
    info = nb.metadata.get("language_info")
    if info is not None:
        nb.metadata["language_info"] = {"name": info.get("name", "python")}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
        if cell.cell_type == "code":
            cell.outputs = _merge_streams(cell.outputs)


def _merge_streams(outputs: list) -> list:
    """Join consecutive chunks of the same stream: how a kernel splits its stdout varies run to run."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (prev is not None and out.get("output_type") == "stream" and prev.get("output_type") == "stream"
                and out.get("name") == prev.get("name")):
            prev["text"] = prev["text"] + out["text"]
        else:
            merged.append(out)
    return merged


def build(py_path: Path, execute: bool = True, timeout: int = 1200) -> float:
    """Write py_path's .ipynb twin from the .py source, executed in a fresh kernel; return seconds taken."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(py_path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    start = time.perf_counter()
    if execute:
        env_path = str(py_path.parent.resolve())
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": env_path}})
        client.execute()
    else:
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
    _clean(nb)
    nbformat.validate(nb)
    nbformat.write(nb, py_path.with_suffix(".ipynb"))
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    sources = chapter_sources(args.chapters)
    if not sources:
        raise ValueError(f"no chapters found in {CHAPTERS_DIR}")
    if args.check:
        bad = 0
        for py in sources:
            problems = pair_differences(py)
            bad += bool(problems)
            for p in problems:
                print(f"{py.name}: {p}")
        print(f"{len(sources) - bad} of {len(sources)} chapter pairs in sync")
        return 1 if bad else 0
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    for py in sources:
        seconds = build(py, execute=not args.no_execute, timeout=args.timeout)
        print(f"{py.with_suffix('.ipynb').name}: {'executed' if not args.no_execute else 'synced'} "
              f"in {seconds:.1f} s", file=sys.stdout, flush=True)
    return 0
