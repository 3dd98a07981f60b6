"""The package as `pip install .` builds it (what deploy/Dockerfile installs) holds everything
and runs on its own: the linked extproc/ and operator/ code, the protobuf stubs and the router
bundles, outside the repository and without the editable install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from gateway_harness import REPO

# Drops the editable install's import hook, so only the installed copy can be imported.
RUN_INSTALLED = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path.insert(0, sys.argv.pop(1)); "
    "sys.argv[0] = 'switchyard'; "
    "runpy.run_module('switchyard.cli', run_name='__main__')"
)


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


def test_the_built_package_is_complete_and_runs(tmp_path: Path) -> None:
    source = _source_copy(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("switchyard-*.whl")
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
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
    )  # fmt: skip
    scored = subprocess.run(
        [sys.executable, "-c", RUN_INSTALLED, str(target), "router", "score"],
        input=json.dumps({"id": "1", "prompt": "Prove that there are infinitely many primes."}),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    line = json.loads(scored.stdout)
    assert line["id"] == "1" and 0 <= line["difficulty"] <= 1
    where = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
         "if 'editable' not in repr(f).lower()]; sys.path.insert(0, sys.argv[1]); "
         "import switchyard.operator.k8s as k; print(k.__file__)", str(target)],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target))
