"""environment.yml (conda) and pyproject.toml describe the same packages with the same lower bounds."""

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}
REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$")


def _parse(spec: str) -> tuple[str, str]:
    name, bound = REQ.match(spec).groups()
    return name.lower().replace("_", "-"), bound.replace(" ", "")


def pyproject_packages() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        specs += extra
    return dict(_parse(s) for s in specs)


def conda_packages() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("dependencies:")
    packages = {}
    for line in lines[start + 1:]:
        m = re.match(r"^  - ([^:#\s][^#]*)$", line)  # top-level list items only (not the pip: section)
        if m:
            name, bound = _parse(m.group(1).strip())
            packages[CONDA_TO_PIP.get(name, name)] = bound
    for tool in ("python", "pip"):
        packages.pop(tool, None)
    return packages


def test_same_packages_and_bounds():
    assert conda_packages() == pyproject_packages()


def test_lower_bounds_only():
    for name, bound in pyproject_packages().items():
        assert bound.startswith(">="), f"{name}: use a lower bound (>=), not {bound!r}"


def test_python_floor_matches():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "  - python" + meta["requires-python"] in (ROOT / "environment.yml").read_text()
