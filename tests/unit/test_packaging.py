"""The distribution lists every source package, and nothing shadows the standard library."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_source_folder_is_a_listed_package() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for top in ("switchyard", "extproc", "operator"):
        for path in (REPO / top).rglob("*.py"):
            if "bundles" in path.parts:
                continue
            rel = path.parent.relative_to(REPO)
            parts = rel.parts if rel.parts[0] == "switchyard" else ("switchyard", *rel.parts)
            found.add(".".join(parts))
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"


def test_operator_folder_does_not_shadow_stdlib_from_repo_root() -> None:
    code = "import operator, collections; print(operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(REPO))
