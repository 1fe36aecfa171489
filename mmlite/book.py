"""The book's build tool: keep chapter pairs (.py <-> .ipynb) in sync and re-execute them in place."""

from __future__ import annotations

import argparse
import os
import re
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


def build(py_path: Path, execute: bool = True, timeout: int = 1200, out: Path | None = None) -> float:
    """Write py_path's .ipynb twin (or `out`) from the .py source, executed in a fresh kernel; return seconds taken."""
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
    nbformat.write(nb, out or py_path.with_suffix(".ipynb"))
    return time.perf_counter() - start


IGNORE_MARK = "# NBVAL_IGNORE_OUTPUT"
_NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e-?\d+)?")


def _text_outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def spread_table(notebooks: list[Path]) -> list[str]:
    """Mean, sd and range over runs of every decimal number printed by the cells marked # NBVAL_IGNORE_OUTPUT.

    The notebooks are runs of one chapter with different seed offsets; a number is matched across runs by
    its cell and its position in that cell's text. A bound for an assert comes from these lines (the project
    sets lower bounds near mean - 4 sd).
    """
    import nbformat
    import numpy as np

    books = [nbformat.read(p, as_version=4) for p in notebooks]
    lines = []
    for i, cell in enumerate(books[0].cells):
        if cell.cell_type != "code" or IGNORE_MARK not in cell.source:
            continue
        texts = [_text_outputs(nb.cells[i]) for nb in books]
        found = [[(m.start(), float(m.group())) for m in _NUMBER.finditer(t)] for t in texts]
        if not found[0]:
            continue
        if len({len(f) for f in found}) != 1:
            lines.append(f"cell {i}: runs print different numbers of values; compare them by hand")
            continue
        lines.append(f"cell {i}: {cell.source.splitlines()[1 if cell.source.startswith(IGNORE_MARK) else 0][:70]}")
        for k, (pos, _) in enumerate(found[0]):
            values = np.array([f[k][1] for f in found])
            start = texts[0].rfind("\n", 0, pos) + 1
            context = texts[0][start:pos].strip()[-40:]
            lines.append(f"  {context:>40} | mean {values.mean():.4g}  sd {values.std(ddof=1) if len(values) > 1 else 0:.3g}"
                         f"  min {values.min():.4g}  max {values.max():.4g}")
    return lines


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
    if args.offsets:
        return _run_offsets(sources, args)
    for py in sources:
        seconds = build(py, execute=not args.no_execute, timeout=args.timeout)
        print(f"{py.with_suffix('.ipynb').name}: {'executed' if not args.no_execute else 'synced'} "
              f"in {seconds:.1f} s", file=sys.stdout, flush=True)
    return 0


def _run_offsets(sources: list[Path], args: argparse.Namespace) -> int:
    """Execute each chapter once per seed offset into args.out, then print the spread of its trained numbers."""
    from mmlite.utils import SEED_OFFSET_VAR

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for py in sources:
        runs = [py.with_suffix(".ipynb")]  # the stored run (offset 0)
        for offset in args.offsets:
            target = out / f"{py.stem}.offset{offset}.ipynb"
            os.environ[SEED_OFFSET_VAR] = str(offset)
            try:
                seconds = build(py, timeout=args.timeout, out=target)
            finally:
                os.environ.pop(SEED_OFFSET_VAR, None)
            print(f"{target}: executed with {SEED_OFFSET_VAR}={offset} in {seconds:.1f} s", flush=True)
            runs.append(target)
        print(f"\n{py.stem}: trained numbers over {len(runs)} runs (offset 0 = the stored notebook)")
        print("\n".join(spread_table(runs)), flush=True)
    return 0
