"""The package as `pip install .` builds it (what deploy/Dockerfile installs) holds everything
and runs on its own: built into a wheel and installed with its declared dependencies into an
empty venv, every subcommand a pod runs starts, and the default router bundle scores a prompt.
A dependency left out of ``[project] dependencies`` (kopf was once only in ``dev``) fails here.

The install resolves from the package index through pip's cache, so only the first run
downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from gateway_harness import REPO

SUBCOMMANDS = ("operator", "extproc", "demo-upstream")


def _source_copy(directory: Path) -> Path:
    """The repository's files (links kept as links), so the build leaves no build/ behind."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source, copy = REPO / name, directory / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            copy.symlink_to(source.readlink())
        else:
            shutil.copy2(source, copy)
    return directory


def _wheel(directory: Path) -> Path:
    source = _source_copy(directory / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(directory / "dist"), str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = (directory / "dist").glob("switchyard-*.whl")
    return wheel


def _empty_venv(directory: Path) -> Path:
    """A venv with nothing but pip; returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    return directory / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of an empty venv into which the built wheel was installed with its dependencies."""
    directory = tmp_path_factory.mktemp("wheel")
    wheel = _wheel(directory)
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "switchyard/extproc/processor.py",
        "switchyard/extproc/router/bundles/default/model.onnx",
        "switchyard/extproc/router/bundles/default/tokenizer.json",
        "switchyard/operator/k8s.py",
        "switchyard/operator/multicluster.py",
        "switchyard/api/v1/routing_pb2.py",
    ):
        assert expected in names, expected
    bin_dir = _empty_venv(directory / "venv")
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-compile", str(wheel)],
        check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    return bin_dir


def _run(bin_dir: Path, *argv: str, stdin: str | None = None) -> str:
    """Run in the venv, outside the repository (nothing of the source tree on sys.path)."""
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, cwd=bin_dir.parent,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def test_the_installed_dependencies_are_consistent(installed: Path) -> None:
    _run(installed, "python", "-m", "pip", "check")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_a_pod_runs_starts(installed: Path, command: str) -> None:
    assert f"usage: switchyard {command}" in _run(installed, "switchyard", command, "--help")


def test_the_servers_import_from_the_venv(installed: Path) -> None:
    where = _run(
        installed, "python", "-c",
        "import switchyard.operator.k8s as k, switchyard.extproc.server as s; "
        "print(k.__file__); print(s.__file__)",
    )  # fmt: skip
    files = where.split()
    assert len(files) == 2
    assert all(Path(f).is_relative_to(installed.parent) for f in files), files


def test_the_default_bundle_scores_a_prompt(installed: Path) -> None:
    prompt = json.dumps({"id": "1", "prompt": "Prove that there are infinitely many primes."})
    line = json.loads(_run(installed, "switchyard", "router", "score", stdin=prompt))
    assert line["id"] == "1" and 0 <= line["difficulty"] <= 1


def test_router_fit_runs_from_the_install(installed: Path, tmp_path: Path) -> None:
    # What a refit Job runs (onnx and scipy are runtime dependencies for it).
    rows = [{"id": i, "prompt": f"q{i}", "model": m, "score": 1.0} for i in range(3) for m in "ab"]
    (tmp_path / "o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    args = ["--outcomes", str(tmp_path / "o.jsonl"), "--out", str(tmp_path / "b")]
    done = subprocess.run(
        ["switchyard", "router", "fit", *args, "--summary", str(summary)],
        capture_output=True, text=True, cwd=installed.parent,
        env={**os.environ, "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert done.returncode == 1
    assert json.loads(summary.read_text())["result"] == "too-few", done.stderr
