"""Router bundle loading and validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from switchyard.extproc.router.bundle import BUNDLES_DIR, BundleError, load_bundle
from switchyard.extproc.scoring import CATEGORIES


def test_builtin_default_loads_and_is_small() -> None:
    b = load_bundle("builtin:default")
    assert b.kind == "static"
    assert sorted(b.categories) == sorted(CATEGORIES)
    assert b.model_path.stat().st_size < 25 * 1024 * 1024
    assert b.truncation.head + b.truncation.tail == b.truncation.max_tokens
    assert "dev_apgr" in b.meta["evaluation"]


def test_committed_bundles_stay_small() -> None:
    total = sum(p.stat().st_size for p in BUNDLES_DIR.rglob("*") if p.is_file())
    assert total < 25 * 1024 * 1024


def test_unknown_builtin_names_the_known_ones() -> None:
    with pytest.raises(BundleError, match="default"):
        load_bundle("builtin:nope")


def test_missing_directory() -> None:
    with pytest.raises(BundleError, match="no such directory"):
        load_bundle("/nonexistent/bundle")


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(BUNDLES_DIR / "default", dst)
    return dst


def _edit(root: Path, **changes: object) -> None:
    doc = yaml.safe_load((root / "router.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (root / "router.yaml").write_text(yaml.safe_dump(doc))


def test_copy_loads(bundle_copy: Path) -> None:
    assert load_bundle(str(bundle_copy)).name == "default"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "other/v9"}, "format"),
        ({"kind": "magic"}, "kind"),
        ({"name": None}, "'name'"),
        ({"labels": {"categories": ["math", "code"]}}, "permutation"),
        ({"outputs": {"difficulty": "difficulty"}}, "categories"),
        ({"inputs": {"input_ids": "input_ids"}}, "attention_mask"),
        ({"truncation": {"max_tokens": 512, "head": 10, "tail": 10}}, "head \\+ tail"),
        ({"model": "missing.onnx"}, "missing.onnx"),
    ],
)
def test_validation_errors(bundle_copy: Path, changes: dict[str, object], message: str) -> None:
    _edit(bundle_copy, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(str(bundle_copy))


def test_missing_router_yaml(bundle_copy: Path) -> None:
    (bundle_copy / "router.yaml").unlink()
    with pytest.raises(BundleError, match=r"no router\.yaml"):
        load_bundle(str(bundle_copy))


def test_invalid_yaml(bundle_copy: Path) -> None:
    (bundle_copy / "router.yaml").write_text("format: [unclosed")
    with pytest.raises(BundleError, match="YAML"):
        load_bundle(str(bundle_copy))


def test_encoder_from_missing_package_is_named(bundle_copy: Path) -> None:
    _edit(
        bundle_copy,
        kind="encoder",
        inputs={"embedding": "embedding"},
        encoder={"package": "no_such_pkg_xyz", "path": "model.onnx", "sha256": "0" * 64},
    )
    with pytest.raises(BundleError, match="no_such_pkg_xyz"):
        load_bundle(str(bundle_copy))


def test_encoder_hash_mismatch(bundle_copy: Path) -> None:
    _edit(
        bundle_copy,
        kind="encoder",
        inputs={"embedding": "embedding"},
        encoder={"package": "yaml", "path": "__init__.py", "sha256": "0" * 64},
    )
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(str(bundle_copy))
