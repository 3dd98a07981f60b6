"""``OnnxRouter``: the trained router behind the ``Scorer`` protocol.

* Execution providers come from config: ``cpu`` (default), ``cuda``, ``tensorrt``, full
  onnxruntime names, or ``auto`` (CUDA for encoder bundles when this build and the machine have
  it, CPU otherwise: a static bundle scores inline on CPU faster than a GPU round trip). Providers
  this onnxruntime build lacks, or that fail to start (a GPU build on a machine without a GPU),
  are dropped with one warning line per bundle and CPU is always last, so asking for CUDA
  without ``onnxruntime-gpu`` or without a GPU runs on CPU.
* Thread counts are explicit (``intra_op_threads``, ``inter_op_threads``; one each by default:
  the ext_proc scales by worker processes, not by threads inside one).
* ``score()`` calls are micro-batched: a call joins the pending batch, which is flushed when it
  holds ``max_batch`` prompts or ``max_wait_ms`` after its first prompt arrived (0 = on the next
  loop iteration, which still groups calls made in the same tick). Tokenisation and inference run
  on a dedicated executor thread, never on the event loop.
* ``score_batch(texts)`` is the synchronous path (CLI, benchmark, evaluation).
* With an ``embedder`` (policies with semantic rules), the prompt's embedding is computed from
  the same token ids, after inference; without one nothing of it runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from switchyard.extproc.batching import BATCH
from switchyard.extproc.router.bundle import Bundle, load_bundle
from switchyard.extproc.router.tokens import FastTokenizer
from switchyard.extproc.scoring import RouterScores, Scorer
from switchyard.extproc.semantic import Embedder

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
AUTO = "auto"


def select_providers(
    requested: Sequence[str] | None, available: Sequence[str] | None = None
) -> list[str]:
    """The providers to use, in order: the requested ones this build has, then CPU.

    Unknown or unavailable providers are dropped with exactly one warning log line.
    """
    have = list(available) if available is not None else ort.get_available_providers()
    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in (requested or ["cpu"])]
    chosen: list[str] = []
    missing: list[str] = []
    for name in wanted:
        if name in chosen:
            continue
        (chosen if name in have else missing).append(name)
    if missing:
        log.warning(
            "router: execution provider(s) %s not available in this onnxruntime build "
            "(available: %s); using %s",
            ", ".join(missing),
            ", ".join(have),
            ", ".join([p for p in chosen if p != CPU] + [CPU]),
        )
    return [p for p in chosen if p != CPU] + [CPU]


def auto_providers(bundle: Bundle, available: Sequence[str] | None = None) -> list[str]:
    """``auto``: CUDA for an encoder bundle when this onnxruntime build has it, else CPU."""
    have = available if available is not None else ort.get_available_providers()
    return [CUDA, CPU] if bundle.encoder is not None and CUDA in have else [CPU]


@functools.cache
def _preload_cuda_libraries() -> None:
    """Make the CUDA/cuDNN libraries of NVIDIA's wheels (the ``gpu`` extra) loadable."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is None:
        return
    try:
        preload()
    except Exception:  # system CUDA may still be found; the session start will tell
        log.debug("onnxruntime.preload_dlls failed", exc_info=True)


def _session(path: str, providers: list[str], intra: int, inter: int) -> ort.InferenceSession:
    if CUDA in providers:
        _preload_cuda_libraries()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = inter
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=opts, providers=providers)


class OnnxRouter:
    """A router bundle loaded into onnxruntime; implements ``Scorer``."""

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        max_batch: int = 32,
        max_wait_ms: float = 0.5,
        inline: bool = False,
    ) -> None:
        if not 0.0 <= max_wait_ms <= 1000.0:
            raise ValueError("max_wait_ms must be between 0 and 1000")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.bundle = bundle
        self.name = f"{bundle.name}@{bundle.version}"
        auto = list(providers or ()) == [AUTO]
        wanted = auto_providers(bundle) if auto else select_providers(providers)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.inline = inline
        t = bundle.truncation
        self.tokenizer = FastTokenizer(
            bundle.tokenizer_path, t.max_tokens, t.head, t.tail, bundle.special_tokens
        )
        self._session = _session(str(bundle.model_path), wanted, intra_op_threads, inter_op_threads)
        # onnxruntime falls back to CPU by itself when a provider fails to start
        self.providers = list(self._session.get_providers())
        self._encoder = (
            _session(str(bundle.encoder.path), self.providers, intra_op_threads, inter_op_threads)
            if bundle.encoder is not None
            else None
        )
        lost = [p for p in wanted if p not in self.providers]
        if lost:
            (log.info if auto else log.warning)(
                "router %s: execution provider(s) %s failed to start; using %s",
                self.name,
                ", ".join(lost),
                ", ".join(self.providers),
            )
        self._out = [bundle.outputs["difficulty"], bundle.outputs["categories"]]
        self.models = bundle.models
        if self.models:  # a fitted bundle: each model's expected score as well
            self._out.append(bundle.outputs["predicted"])
        self._ids_name = bundle.inputs.get("input_ids", "input_ids")
        self._mask_name = bundle.inputs.get("attention_mask")
        self._ones_buf = np.ones((1, bundle.truncation.max_tokens), dtype=np.int64)
        self._cats = bundle.categories
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router")
        self._pending: list[tuple[str, asyncio.Future[RouterScores], Embedder | None]] = []
        self._flush_handle: asyncio.Handle | None = None

    # -- synchronous path --------------------------------------------------------------------
    def _pad(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Token ids [n, width] padded with 0 ([PAD]) and the attention mask."""
        encode = self.tokenizer.encode_array
        if len(texts) == 1:  # the common gateway case: no padding work
            one = encode(texts[0])[None, :]
            return one, self._ones(one.shape[1])
        encoded = [encode(t) for t in texts]
        width = max(e.shape[0] for e in encoded)
        ids = np.zeros((len(encoded), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, : e.shape[0]] = e
            mask[row, : e.shape[0]] = 1
        return ids, mask

    def _ones(self, width: int) -> npt.NDArray[np.int64]:
        """A [1, width] mask of ones (a view of a preallocated buffer)."""
        if width > self._ones_buf.shape[1]:
            self._ones_buf = np.ones((1, width), dtype=np.int64)
        return self._ones_buf[:, :width]

    def infer(
        self, texts: Sequence[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Raw outputs: difficulty [n] and category probabilities [n, 7] (bundle label order)."""
        out = self.infer_all(texts)
        return out[0], out[1]

    def infer_all(self, texts: Sequence[str]) -> list[npt.NDArray[np.float32]]:
        """``infer``'s outputs, plus ``predicted`` [n, models] for a fitted bundle."""
        return self._run(*self._pad(texts))

    def _run(
        self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
    ) -> list[npt.NDArray[np.float32]]:
        if self._encoder is None:
            feeds = {self._ids_name: ids}
            if self._mask_name is not None:  # graphs that pad with zero rows need no mask
                feeds[self._mask_name] = mask
        else:
            hidden = self._encoder.run(
                [self.bundle.encoder.output],  # type: ignore[union-attr]
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            m = mask[..., None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
            n_tokens = mask.sum(axis=1, keepdims=True).astype(np.float32) - 2.0
            feeds = {
                self.bundle.inputs["embedding"]: pooled.astype(np.float32),
                self.bundle.inputs.get("n_tokens", "n_tokens"): n_tokens,
            }
        return [np.asarray(o, np.float32) for o in self._session.run(self._out, feeds)]

    def score_batch(
        self, texts: Sequence[str], embedder: Embedder | None = None
    ) -> list[RouterScores]:
        """Score prompts synchronously, ``max_batch`` at a time (with ``embedder``: and embed
        them, from the same token ids)."""
        out: list[RouterScores] = []
        for start in range(0, len(texts), self.max_batch):
            chunk = texts[start : start + self.max_batch]
            ids, mask = self._pad(chunk)
            raw = self._run(ids, mask)
            # Python floats up front: iterating numpy arrays makes a numpy scalar per element
            preds = raw[2].tolist() if self.models else [None] * len(chunk)
            vecs = None
            if embedder is not None:
                vecs = (
                    [embedder.embed_ids(ids[0])]
                    if len(chunk) == 1
                    else list(embedder.embed_rows(ids, mask))
                )
            for i, (d, probs, pred) in enumerate(
                zip(raw[0].tolist(), raw[1].tolist(), preds, strict=True)
            ):
                cats = dict(zip(self._cats, probs, strict=True))
                out.append(
                    RouterScores(
                        difficulty=min(1.0, max(0.0, d)) if math.isfinite(d) else 0.5,
                        category=max(cats, key=cats.__getitem__),
                        categories=cats,
                        predicted=None
                        if pred is None
                        else dict(zip(self.models, pred, strict=True)),
                        embedding=None if vecs is None else vecs[i],
                    )
                )
        return out

    # -- asynchronous, micro-batched path ------------------------------------------------------
    async def score(self, text: str, embedder: Embedder | None = None) -> RouterScores:
        if self.inline:
            # Static bundle on CPU: ~0.07 ms for a short prompt, less than the thread hand-off
            # and timer of the batched path cost (measured 0.5 ms of CPU per request). Prompts
            # that arrived in the same socket read are scored as one batch, with no waiting.
            if embedder is not None:
                if BATCH.is_open:
                    return await BATCH.submit(self._score_embedded, (text, embedder))
                return self.score_batch([text], embedder)[0]
            if BATCH.is_open:
                return await BATCH.submit(self.score_batch, text)
            return self.score_batch([text])[0]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[RouterScores] = loop.create_future()
        self._pending.append((text, fut, embedder))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._flush_handle is None:
            if self.max_wait_s > 0:
                self._flush_handle = loop.call_later(self.max_wait_s, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)
        return await fut

    def _score_embedded(self, items: list[tuple[str, Embedder]]) -> list[RouterScores]:
        """``score_batch`` with embeddings (one scorer's items share its bundle's embedder)."""
        return self.score_batch([t for t, _ in items], items[0][1])

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        # embedded for all when one asks: one scorer's callers share its bundle's embedder
        texts = [t for t, _, _ in batch]
        embedder = next((e for _, _, e in batch if e is not None), None)
        if embedder is None:
            job = loop.run_in_executor(self._executor, self.score_batch, texts)
        else:
            job = loop.run_in_executor(self._executor, self.score_batch, texts, embedder)
        job.add_done_callback(lambda done: self._deliver(done, batch))

    @staticmethod
    def _deliver(
        done: asyncio.Future[list[RouterScores]],
        batch: list[tuple[str, asyncio.Future[RouterScores], Embedder | None]],
    ) -> None:
        exc = done.exception()
        if exc is not None:
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut, _), result in zip(batch, done.result(), strict=True):
            if not fut.done():
                fut.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def load_scorer(bundle: str, providers: list[str] | None = None) -> Scorer:
    """Load a router bundle (``builtin:default``, ``builtin:minilm`` or a directory) on
    ``providers`` (see ``select_providers``; ``["auto"]``: see ``auto_providers``).

    A static-embedding bundle on CPU scores inline on the worker's event loop (each ext_proc
    worker owns a core, so a thread would add hand-off cost and no capacity); an encoder
    bundle, or any bundle on a GPU, goes through the micro-batcher on an executor thread.
    """
    router = OnnxRouter(load_bundle(bundle), providers=providers)
    router.inline = router.bundle.encoder is None and router.providers == [CPU]
    return router
