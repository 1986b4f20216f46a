"""The architecture holds: import-linter's contracts in pyproject.toml are kept (mesh runs one way, the TUI
talks HTTP only, models is pure), and the wheel installs one top-level package, `shoal/`."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mesh": "shoal/mesh", "models": "shoal/models", "tui": "shoal/tui"}
"""Source folder -> where it lands in the installed namespace (pyproject's package-dir)."""


def test_import_contracts_are_kept() -> None:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"an import contract is broken:\n{result.stdout}{result.stderr}"
    summary = re.search(r"Contracts: (\d+) kept, (\d+) broken", result.stdout)
    assert summary is not None, result.stdout + result.stderr
    assert int(summary[1]) >= 3 and int(summary[2]) == 0


COLLABORATORS = frozenset(
    {"node", "mesh", "service", "router", "host", "peer", "store", "link", "served", "engine", "stage", "bus",
     "ipfs", "app", "record", "blocks", "gossip", "discovery"}
)
"""Parameter names that hold another part of the system: each gets a real type or a Protocol, never Any."""


def _any_collaborators(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args
            for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
                annotation = arg.annotation
                if arg.arg in COLLABORATORS and isinstance(annotation, ast.Name) and annotation.id == "Any":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg}: Any)")
    return found


def test_no_collaborator_is_typed_any() -> None:
    offenders = [hit for path in sorted((ROOT / "mesh").rglob("*.py")) for hit in _any_collaborators(path)]
    assert not offenders, "type these with the class or a Protocol at the seam:\n" + "\n".join(offenders)


def _package_dirs() -> list[str]:
    """Every package of the source tree, as its path inside the wheel (`shoal/mesh/api`, ...)."""
    found = []
    for folder, target in FOLDERS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder).as_posix()
            found.append(target if relative == "." else f"{target}/{relative}")
    return found


def test_wheel_has_only_shoal_at_its_top(tmp_path: Path) -> None:
    source = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 and "No matching distribution found" in result.stderr:
        pytest.skip(f"pip cannot install the build backend here (no index): {result.stderr[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("shoal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"shoal"}
    assert "shoal/__init__.py" not in names  # `shoal` is a namespace package
    assert "shoal/tui/shoal.tcss" in names
    missing = [package for package in _package_dirs() if f"{package}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (add them to [tool.setuptools] packages): {missing}"


def test_architecture_doc_maps_every_package() -> None:
    """docs/architecture.md's package map names every sub-package of mesh/ and models/ and every top-level
    module of mesh/ (a new one is added to the map, and to the layers contract, when it is created)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    inits = [*(ROOT / "mesh").glob("*/__init__.py"), *(ROOT / "models").glob("*/__init__.py")]
    packages = [f"{init.parent.name}/" for init in inits]
    modules = [path.name for path in (ROOT / "mesh").glob("*.py") if not path.name.startswith("__")]
    missing = [name for name in [*packages, *modules] if name not in text]
    assert not missing, f"docs/architecture.md does not map: {missing}"
