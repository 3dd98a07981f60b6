"""Semantic rule conditions: a prompt matches when it is close to one of a few examples.

The embedding is the router bundle's own: a static bundle's graph starts with a token table
whose rows are ``[w_t * e_t (dim), 1, class indicators]`` (``training/export.static_graph``),
so the SIF-weighted mean of the token vectors, L2-normalised, is the sum of the first ``dim``
columns of the prompt's rows, normalised (the 1 / sum(w) factor cancels). The table is read
from ``model.onnx`` once per process, with a minimal ONNX protobuf schema (the ``onnx``
package is a training dependency only), and shared by the config compiler (which embeds a
rule's examples once per config version) and the scorer (which embeds the prompt from the
token ids it already made for scoring, only for policies with a semantic rule).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from tokenizers import Tokenizer

from switchyard.extproc.router.bundle import Bundle, BundleError, load_bundle, resolve
from switchyard.extproc.router.tokens import FastTokenizer

F32 = npt.NDArray[np.float32]
_FLOAT, _FLOAT16 = 1, 10  # onnx TensorProto.DataType


class EmbedderError(ValueError):
    """A bundle that gives no static token embeddings (an encoder bundle, a foreign graph)."""


@functools.cache
def _model_class() -> Any:
    """``onnx.ModelProto`` reduced to what the table lookup reads (other fields are skipped)."""
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="switchyard_onnx_subset.proto", package="sy")

    def msg(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name

    rep, opt = f.LABEL_REPEATED, f.LABEL_OPTIONAL
    msg(
        "Tensor",
        ("dims", 1, f.TYPE_INT64, rep, ""),
        ("data_type", 2, f.TYPE_INT32, opt, ""),
        ("float_data", 4, f.TYPE_FLOAT, rep, ""),
        ("name", 8, f.TYPE_STRING, opt, ""),
        ("raw_data", 9, f.TYPE_BYTES, opt, ""),
    )
    msg(
        "Node",
        ("input", 1, f.TYPE_STRING, rep, ""),
        ("output", 2, f.TYPE_STRING, rep, ""),
        ("op_type", 4, f.TYPE_STRING, opt, ""),
    )
    msg(
        "Graph",
        ("node", 1, f.TYPE_MESSAGE, rep, ".sy.Node"),
        ("initializer", 5, f.TYPE_MESSAGE, rep, ".sy.Tensor"),
    )
    msg("Model", ("graph", 7, f.TYPE_MESSAGE, opt, ".sy.Graph"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("sy.Model"))


def token_table(model_path: Path, input_ids: str = "input_ids") -> F32:
    """The first table the graph gathers ``input_ids`` from, as float32 [vocab, width]."""
    model = _model_class().FromString(model_path.read_bytes())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) != 2 or node.input[1] != input_ids:
            continue
        source = node.input[0]
        while source not in inits and source in producers:  # the fp16 -> fp32 Cast
            up = producers[source]
            if up.op_type != "Cast" or not up.input:
                break
            source = up.input[0]
        tensor = inits.get(source)
        if tensor is None or len(tensor.dims) != 2:
            break
        if tensor.data_type == _FLOAT16 and tensor.raw_data:
            flat = np.frombuffer(tensor.raw_data, dtype="<f2").astype(np.float32)
        elif tensor.data_type == _FLOAT and tensor.raw_data:
            flat = np.frombuffer(tensor.raw_data, dtype="<f4").astype(np.float32)
        elif tensor.data_type == _FLOAT:
            flat = np.asarray(tensor.float_data, dtype=np.float32)
        else:
            break
        return flat.reshape(tuple(tensor.dims))
    raise EmbedderError(f"{model_path}: no token table gathered from {input_ids!r}")


class Embedder:
    """Unit-length SIF-weighted mean token embeddings of one static router bundle."""

    def __init__(self, bundle: Bundle, vectors: F32) -> None:
        self.bundle = bundle
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        """[vocab, dim]: the table's ``w_t * e_t`` columns (common direction removed)."""
        self.dim = int(vectors.shape[1])
        self._ones = np.ones(bundle.truncation.max_tokens, dtype=np.float32)

    @functools.cached_property
    def tokenizer(self) -> FastTokenizer:
        """For config-time text (the scorer embeds prompts from its own ids)."""
        t = self.bundle.truncation
        return FastTokenizer(
            self.bundle.tokenizer_path, t.max_tokens, t.head, t.tail, self.bundle.special_tokens
        )

    def embed_ids(self, ids: npt.NDArray[np.int64]) -> F32:
        """One prompt's embedding from its token ids (all of them count)."""
        n = ids.shape[0]
        if n > self._ones.shape[0]:
            self._ones = np.ones(n, dtype=np.float32)
        # a BLAS vector-matrix product sums the rows 2x faster than ndarray.sum(axis=0)
        v: F32 = self._ones[:n] @ self.vectors.take(ids, axis=0)
        norm = math.sqrt(v.dot(v))
        if norm > 0.0:
            v *= 1.0 / norm
        return v

    def embed_rows(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> F32:
        """Embeddings [n, dim] of a padded batch (``mask`` 1 on real tokens)."""
        if ids.shape[0] == 1:
            return self.embed_ids(ids[0])[None, :]
        sums = (mask.astype(np.float32)[:, None, :] @ np.take(self.vectors, ids, axis=0))[:, 0]
        norms = np.sqrt((sums * sums).sum(axis=1, keepdims=True))
        out: F32 = sums / np.maximum(norms, 1e-12)
        return out

    def embed_text(self, text: str) -> F32:
        """One text's embedding, tokenised as the router tokenises prompts."""
        return self.embed_ids(self.tokenizer.encode_array(text))

    def embed_texts(self, texts: list[str]) -> F32:
        """Embeddings [n, dim] of texts, tokenised as the router tokenises prompts."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.embed_text(t) for t in texts])


def load_embedder(ref: str) -> Embedder:
    """The embedder of router bundle ``ref`` (``builtin:<name>`` or a directory), loaded once
    per process and version of the bundle's files; raises ``EmbedderError`` naming why not."""
    try:
        root = resolve(ref)
        stat = (root / "router.yaml").stat()
        model = (root / "model.onnx").stat()
    except (BundleError, OSError) as exc:
        raise EmbedderError(f"router bundle {ref!r}: {exc}") from None
    return _load(ref, str(root), (stat.st_mtime_ns, model.st_mtime_ns, model.st_size))


@functools.lru_cache(maxsize=8)
def _cached(root: str, version: tuple[int, int, int]) -> Embedder:
    return _read(root)


def _load(ref: str, root: str, version: tuple[int, int, int]) -> Embedder:
    try:
        return _cached(root, version)
    except EmbedderError as exc:
        raise EmbedderError(f"router bundle {ref!r}: {exc}") from None


def _read(ref: str) -> Embedder:
    try:
        bundle = load_bundle(ref)
    except BundleError as exc:
        raise EmbedderError(str(exc)) from None
    if bundle.kind != "static":
        raise EmbedderError(
            f"a bundle of kind {bundle.kind!r}; semantic conditions need a static-embedding "
            "bundle (builtin:default, or one fitted from it by `switchyard router fit`)"
        )
    features = bundle.meta.get("features")
    extra = features.get("extra") if isinstance(features, dict) else None
    if not isinstance(extra, list):
        raise EmbedderError("router.yaml lists no features.extra (not a static token table)")
    try:
        table = token_table(bundle.model_path, bundle.inputs.get("input_ids", "input_ids"))
    except (OSError, DecodeError) as exc:
        raise EmbedderError(f"{bundle.model_path}: {exc}") from None
    dim = table.shape[1] - 1 - len(extra)  # [w e (dim), 1, extra...]
    if dim < 1:
        raise EmbedderError(f"token table too narrow ({table.shape[1]} columns)")
    vocab = Tokenizer.from_file(str(bundle.tokenizer_path)).get_vocab()
    special = [i for w, i in vocab.items() if len(w) > 2 and w[0] == "[" and w[-1] == "]"]
    return Embedder(bundle, without_common_direction(table[:, :dim], special))


def without_common_direction(vectors: F32, special: list[int]) -> F32:
    """``vectors`` with the vocabulary's mean direction projected out of every row.

    Every token vector shares a large common component (the mean of the unit rows has norm
    0.44 in the default bundle), so any two prompts score about 0.7 and the threshold would
    live in a narrow band. Removing it (SIF's common-component removal, here estimated from the
    vocabulary itself, so it needs no corpus) spreads the scale: unrelated prompts score about
    0.25, paraphrases about 0.6 (docs/router-model.md, "Semantic rule conditions"). The
    projection is linear, so it is applied to the table once, not per request. ``special``
    rows ([PAD], [unusedN], ...) are left out of the mean."""
    keep = np.ones(vectors.shape[0], dtype=bool)
    keep[[i for i in special if i < len(keep)]] = False
    rows = vectors[keep].astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    mean = (rows / np.maximum(norms, 1e-12)).mean(axis=0)
    u = mean / np.linalg.norm(mean)
    out: F32 = (vectors - np.outer(vectors @ u, u)).astype(np.float32)
    return out


@dataclass(frozen=True, slots=True)
class SemanticCondition:
    """One rule's examples, embedded, and its threshold."""

    examples: F32
    """[k, dim] unit rows: rows ``start:end`` of its policy's ``semantic_examples``."""
    threshold: float
    start: int = 0
    end: int = 0

    def similarity(self, embedding: F32) -> float:
        """The prompt's cosine similarity to its closest example."""
        return float((self.examples @ embedding).max())

    def best(self, similarities: list[float]) -> float:
        """``similarity`` from the policy's similarities to all its examples."""
        return max(similarities[self.start : self.end])
