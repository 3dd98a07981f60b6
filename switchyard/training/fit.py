"""``switchyard router fit``: a router bundle that predicts each model's expected score.

From outcome records (``switchyard.training.outcomes``) to a bundle the gateway loads:

1. Features, computed by the base bundle's own graph (``builtin:default``): its feature row
   (SIF-weighted static embedding, log length, token-class fractions), its difficulty logit and
   its category probabilities (``dense``); and a bag of WordPiece tokens (count / n, times a
   smoothed IDF) over the ``--vocab`` tokens most prompts share (``bag``).
2. One ridge regression per model on [standardised dense | beta x bag], in closed form from one
   eigendecomposition per fold (so the penalty grid is nearly free). The bag weight
   ``beta`` (0 = dense features only) and the penalty ``alpha`` are chosen by k-fold
   cross-validation on the outcomes given, nothing else, by how well each fold's model ranks
   its prompts (correlation of the predicted and observed score gap of every pair of models).
3. The ridge prediction is blended per model with the base bundle's difficulty logit and the
   log length, the four coefficients fitted on the out-of-fold predictions (``fit_stack``):
   with few outcomes the ridge's weight goes to 0 and the head falls back to the base
   bundle's ranking; as outcomes grow the fitted part takes over. The blend is linear, so it
   folds into the same head.
4. A held-out slice (20 % of prompts by a hash of the text) is scored by a model fitted on the
   rest with the chosen settings: APGR and strong-call share for 95 % quality for every pair of
   models whose mean scores differ, against the length router and the base bundle's
   difficulty. The bundle's head is then refitted on all outcomes.
5. The head is appended to the base graph (one ONNX graph: ``predicted`` [batch, models],
   clipped to [0, 1], next to the base's ``difficulty`` and ``categories``), and ``router.yaml``
   records the outcome files' hashes, counts, the CV choice and the held-out figures.

When the cross-validated router does not beat the length router on the outcomes given, ``fit``
says so and writes nothing (``--force`` writes anyway).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import scipy.sparse as sp
import yaml
from onnx import TensorProto, helper, numpy_helper

from switchyard.extproc.router import metrics
from switchyard.extproc.router.bundle import Bundle, load_bundle, sha256_file
from switchyard.extproc.router.tokens import FastTokenizer
from switchyard.training.outcomes import Outcomes

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

BASE = "builtin:default"
FEATURES = "fit/features"
ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)
BETAS = (0.0, 1.0, 3.0, 10.0, 30.0)
#: weight of the base bundle's difficulty logit relative to the other standardised columns: its
#: penalty is ``alpha / gamma**2``, so a large ``gamma`` keeps the default's ranking as a prior
#: that few outcomes can rescale per model but not shrink away
GAMMAS = (1.0,)
#: the column of the difficulty logit in the dense features (then the 7 category probabilities)
PRIOR = -8
#: the column of log(tokens + 1) / 6 in the dense features (after the 128-d embedding)
LENGTH = 128
HOLDOUT_FRACTION = 0.2
MIN_PROMPTS = 20
#: pairs whose mean scores differ by less than this are not a routing decision
MIN_GAP = 0.02


class TooFewOutcomes(ValueError):
    """The outcomes cannot support a router that beats the length router."""


# --- features ------------------------------------------------------------------------------
def _feature_nodes(model: onnx.ModelProto) -> onnx.NodeProto:
    """``fit/features`` = [base feature row, difficulty logit, category probabilities]."""
    nodes = model.graph.node
    concat = [n for n in nodes if n.op_type == "Concat"]
    sigmoid = [n for n in nodes if n.op_type == "Sigmoid"]
    if len(concat) != 1 or len(sigmoid) != 1:
        raise ValueError("the base bundle is not a static-embedding router graph")
    return helper.make_node(
        "Concat", [concat[0].output[0], sigmoid[0].input[0], "categories"], [FEATURES], axis=1
    )


class Featurizer:
    """The base bundle's graph with its feature row exposed, and its tokeniser."""

    def __init__(self, base: str = BASE) -> None:
        self.bundle: Bundle = load_bundle(base)
        if self.bundle.kind != "static":
            raise ValueError(f"base bundle {base!r} must be a static-embedding bundle")
        self.base = base
        model = onnx.load(str(self.bundle.model_path))
        model.graph.node.append(_feature_nodes(model))
        model.graph.output.append(
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", None])
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        t = self.bundle.truncation
        self.tokenizer = FastTokenizer(
            self.bundle.tokenizer_path, t.max_tokens, t.head, t.tail, self.bundle.special_tokens
        )
        self.vocab = self.tokenizer.vocab_size

    def __call__(self, texts: Sequence[str], batch: int = 64) -> tuple[F64, sp.csr_matrix]:
        """Dense features [n, d] and token counts [n, vocab] (the ids the graph sees)."""
        ids = [self.tokenizer.encode_array(t) for t in texts]
        lengths = np.array([len(i) for i in ids])
        order = np.argsort(lengths, kind="stable")  # similar lengths per batch: little padding
        dense: F64 | None = None
        for start in range(0, len(ids), batch):
            rows = order[start : start + batch]
            width = max(1, int(lengths[rows].max()))
            tok = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(tok)
            for r, i in enumerate(rows):
                tok[r, : lengths[i]] = ids[i]
                mask[r, : lengths[i]] = 1
            (f,) = self.session.run([FEATURES], {"input_ids": tok, "attention_mask": mask})
            if dense is None:
                dense = np.zeros((len(ids), f.shape[1]))
            dense[rows] = f
        indptr = np.concatenate(([0], np.cumsum(lengths)))
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        counts = sp.csr_matrix(
            (np.ones(flat.size), flat, indptr), shape=(len(ids), self.vocab), dtype=np.float64
        )
        counts.sum_duplicates()
        assert dense is not None
        return dense, counts


@dataclass(slots=True)
class Design:
    """Standardised dense features and the scaled token bag (unit mean squared row norm)."""

    dense: F64  # [n, d], standardised
    bag: sp.csr_matrix  # [n, V] over the chosen vocabulary
    mean: F64
    scale: F64
    vocab: npt.NDArray[np.int64]  # token id of each bag column
    weight: F64  # per-column factor: idf / row-norm scale (applied to count / n)

    def with_rows(self, rows: npt.NDArray[np.intp]) -> Design:
        return Design(
            self.dense[rows], self.bag[rows], self.mean, self.scale, self.vocab, self.weight
        )

    def with_prior(self, gamma: float) -> Design:
        """The design with the difficulty-logit column multiplied by ``gamma``."""
        if gamma == 1.0:
            return self
        dense = self.dense.copy()
        dense[:, PRIOR] *= gamma
        return Design(dense, self.bag, self.mean, self.scale, self.vocab, self.weight)


def design(dense: F64, counts: sp.csr_matrix, max_vocab: int) -> Design:
    """Standardise ``dense``; keep the ``max_vocab`` tokens in most prompts (at least 2)."""
    mean = dense.mean(axis=0)
    scale = dense.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    z = (dense - mean) / scale
    n = counts.shape[0]
    df = np.asarray((counts > 0).sum(axis=0)).ravel()
    cand = np.flatnonzero(df >= 2)
    vocab = cand[np.argsort(-df[cand], kind="stable")][:max_vocab]
    vocab = np.sort(vocab).astype(np.int64)
    ntok = np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1.0)
    idf = np.log((1.0 + n) / (1.0 + df[vocab])) + 1.0
    tf = sp.diags(1.0 / ntok) @ counts[:, vocab]
    bag = (tf @ sp.diags(idf)).tocsr()
    rms = float(np.sqrt(bag.multiply(bag).sum() / max(n, 1))) if vocab.size else 1.0
    weight = idf / max(rms, 1e-12)
    bag = (tf @ sp.diags(weight)).tocsr()
    return Design(z, bag, mean, scale, vocab, weight)


# --- ridge -------------------------------------------------------------------------------
# Every fit centres X and Y on its training rows (the intercept is not penalised) and takes one
# eigendecomposition, of X'X (p x p) when there are more rows than columns or of XX' (n x n)
# otherwise; then every penalty costs a matrix product, so the CV grid is nearly free.
@dataclass(slots=True)
class Head:
    wd: F64  # [1 + d, models]: intercept, then the standardised dense features
    wb: F64  # [V, models]: the bag columns (beta already applied)


Columns = tuple[F64, sp.csr_matrix | None]


def _columns(d: Design, rows: npt.NDArray[np.intp], beta: float) -> Columns:
    """The design's rows as (dense block, beta x bag block or None)."""
    if beta == 0.0 or d.vocab.size == 0:
        return d.dense[rows], None
    return d.dense[rows], (beta * d.bag[rows]).tocsr()


def ridge_path(x: Columns, y: F64, alphas: Sequence[float]) -> list[tuple[F64, F64]]:
    """(weights [p, m], intercepts [m]) of ridge regression on [dense | bag] for each penalty."""
    dx, bx = x
    n = dx.shape[0]
    p = dx.shape[1] + (bx.shape[1] if bx is not None else 0)
    mu = dx.mean(axis=0)
    if bx is not None:
        mu = np.r_[mu, np.asarray(bx.mean(axis=0)).ravel()]
    ybar = y.mean(axis=0)
    out = []
    if n >= p:  # primal, X'X by blocks (BLAS for the dense block, sparse products for the bag)
        xtx = dx.T @ dx
        xty = dx.T @ y
        if bx is not None:
            bd = np.asarray(bx.T @ dx)
            xtx = np.block([[xtx, bd.T], [bd, np.asarray((bx.T @ bx).toarray())]])
            xty = np.vstack([xty, np.asarray(bx.T @ y)])
        lam, v = np.linalg.eigh(xtx - n * np.outer(mu, mu))
        vr = v.T @ (xty - n * np.outer(mu, ybar))
        for a in alphas:
            w = v @ (vr / (np.maximum(lam, 0.0) + a)[:, None])
            out.append((w, ybar - mu @ w))
    else:
        full = dx if bx is None else np.hstack([dx, bx.toarray()])
        xc = full - mu
        s, u = np.linalg.eigh(xc @ xc.T)
        uy = u.T @ (y - ybar)
        for a in alphas:
            w = xc.T @ (u @ (uy / (np.maximum(s, 0.0) + a)[:, None]))
            out.append((w, ybar - mu @ w))
    return out


def _head_part(d: Design, beta: float, w: F64, b: F64) -> tuple[F64, F64]:
    nd = d.dense.shape[1]
    wb = beta * w[nd:] if w.shape[0] > nd else np.zeros((d.vocab.size, w.shape[1]))
    return np.vstack([b[None, :], w[:nd]]), wb


def predict(d: Design, rows: npt.NDArray[np.intp], wd: F64, wb: F64) -> F64:
    lin = wd[0] + d.dense[rows] @ wd[1:] + np.asarray(d.bag[rows] @ wb)
    return np.asarray(np.clip(lin, 0.0, 1.0))


def _groups(scores: F64) -> list[list[int]]:
    """Models that have outcomes on exactly the same prompts are fitted together."""
    out: dict[bytes, list[int]] = {}
    for j in range(scores.shape[1]):
        out.setdefault(np.isfinite(scores[:, j]).tobytes(), []).append(j)
    return list(out.values())


def fit_head(
    d: Design,
    rows: npt.NDArray[np.intp],
    scores: F64,
    alpha: float,
    beta: float,
    gamma: float = 1.0,
) -> Head:
    """Ridge per group of models on ``d``'s rows; weights are on ``d``'s own (unweighted)
    standardised columns."""
    d = d.with_prior(gamma)
    m = scores.shape[1]
    wd = np.zeros((d.dense.shape[1] + 1, m))
    wb = np.zeros((d.vocab.size, m))
    for group in _groups(scores[rows]):
        have = rows[np.isfinite(scores[rows, group[0]])]
        if have.size == 0:
            continue
        ((w, b),) = ridge_path(_columns(d, have, beta), scores[np.ix_(have, group)], [alpha])
        wd[:, group], wb[:, group] = _head_part(d, beta, w, b)
    wd[PRIOR] *= gamma  # back to the unweighted column
    return Head(wd, wb)


@dataclass(slots=True)
class CVResult:
    alpha: float
    beta: float
    gamma: float
    folds: int
    criterion: dict[str, float]  # "alpha/beta/gamma" -> out-of-fold gap correlation
    oof: F64  # out-of-fold predictions of the chosen setting [rows, models]
    fold_of: npt.NDArray[np.intp]  # the fold of each row


def cv_error(pred: F64, y: F64) -> float:
    """Mean squared error of the predicted score *gaps* over every pair of models (what a
    routing decision reads); of the scores themselves when there is one model."""
    m = y.shape[1]
    if m == 1:
        ok = np.isfinite(y[:, 0])
        return float(np.mean((pred[ok, 0] - y[ok, 0]) ** 2))
    errs = []
    for i in range(m):
        for j in range(i + 1, m):
            ok = np.isfinite(y[:, i]) & np.isfinite(y[:, j])
            if ok.any():
                gap = (pred[ok, j] - pred[ok, i]) - (y[ok, j] - y[ok, i])
                errs.append(float(np.mean(gap**2)))
    return float(np.mean(errs)) if errs else float("nan")


def _corr(a: F64, b: F64) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / den if den > 1e-12 else 0.0


def cv_rank(pred: F64, y: F64, fold_of: npt.NDArray[np.intp]) -> float:
    """Mean over folds and pairs of models of the correlation between the predicted and the
    observed score gap (of the scores when there is one model): how well each fold's model
    *ranks* prompts for a routing decision, whatever the scale of its predictions (a squared
    error rewards shrinking towards the mean, which ranks prompts by noise)."""
    m = y.shape[1]
    pairs = [(0, 0)] if m == 1 else [(i, j) for i in range(m) for j in range(i + 1, m)]
    vals = []
    for k in np.unique(fold_of):
        f = fold_of == k
        for i, j in pairs:
            ok = f & np.isfinite(y[:, i]) & np.isfinite(y[:, j])
            if ok.sum() < 3:
                continue
            if i == j:
                vals.append(_corr(pred[ok, i], y[ok, i]))
            else:
                vals.append(_corr(pred[ok, j] - pred[ok, i], y[ok, j] - y[ok, i]))
    return float(np.mean(vals)) if vals else 0.0


def _kernel_path(
    kd: F64,
    kb: F64,
    d: Design,
    rows: npt.NDArray[np.intp],
    y: F64,
    beta: float,
    alphas: Sequence[float],
) -> list[tuple[F64, F64]]:
    """``ridge_path`` in the dual from precomputed kernels ``kd`` = DD', ``kb`` = BB' of
    ``rows`` (so a fold's kernel is a sub-block and beta only rescales ``kb``)."""
    k = kd + beta * beta * kb if beta else kd
    rm = k.mean(axis=0)
    kc = k - rm[None, :] - rm[:, None] + rm.mean()
    s, u = np.linalg.eigh(kc)
    ybar = y.mean(axis=0)
    uy = u.T @ (y - ybar)
    dx = d.dense[rows]
    bx = d.bag[rows]
    mu_d = dx.mean(axis=0)
    mu_b = np.asarray(bx.mean(axis=0)).ravel()
    out = []
    for a in alphas:
        c = u @ (uy / (np.maximum(s, 0.0) + a)[:, None])
        sc = c.sum(axis=0)
        wd = dx.T @ c - np.outer(mu_d, sc)
        parts = [wd]
        b = ybar - mu_d @ wd
        if beta and d.vocab.size:
            wbb = beta * (np.asarray(bx.T @ c) - np.outer(mu_b, sc))
            parts.append(wbb)
            b = b - beta * (mu_b @ wbb)
        out.append((np.vstack(parts), b))
    return out


def _key(a: float, b: float, g: float) -> str:
    return f"{a:g}/{b:g}/{g:g}"


def cross_validate(
    d: Design,
    rows: npt.NDArray[np.intp],
    scores: F64,
    folds: int = 5,
    alphas: Sequence[float] = ALPHAS,
    betas: Sequence[float] = BETAS,
    seed: int = 0,
    gammas: Sequence[float] = GAMMAS,
) -> CVResult:
    """k-fold CV over (alpha, beta, gamma) on ``rows``; the error is ``cv_error``.
    ``fold_of`` in the result's ``oof`` order is ``rows``' order."""
    folds = max(2, min(folds, len(rows)))
    fold_of = np.random.default_rng(seed).permutation(len(rows)) % folds
    m = scores.shape[1]
    settings = [(a, b, g) for g in gammas for b in betas for a in alphas]
    oof = {s: np.full((len(rows), m), np.nan) for s in settings}
    p = d.dense.shape[1] + d.vocab.size
    for group_list in _groups(scores[rows]):
        group = np.asarray(group_list, dtype=np.intp)
        has = np.isfinite(scores[rows, group[0]])
        g_rows = rows[has]
        g_fold = fold_of[has]
        g_pos = np.flatnonzero(has)
        dual = len(g_rows) < p
        if dual:  # kernels of the group's rows, once; folds take sub-blocks
            kd = d.dense[g_rows] @ d.dense[g_rows].T
            kb = np.asarray((d.bag[g_rows] @ d.bag[g_rows].T).toarray())
            prior = d.dense[g_rows, PRIOR]
            kp = np.outer(prior, prior)
        for g in gammas:
            dg = d.with_prior(g)
            kdg = kd + (g * g - 1.0) * kp if dual else None
            for k in range(folds):
                te = np.flatnonzero(g_fold == k)
                tr = np.flatnonzero(g_fold != k)
                if te.size == 0 or tr.size < 2:
                    continue
                y = scores[np.ix_(g_rows[tr], group)]
                for b in betas:
                    if kdg is not None and b:
                        path = _kernel_path(
                            kdg[np.ix_(tr, tr)], kb[np.ix_(tr, tr)], dg, g_rows[tr], y, b, alphas
                        )
                    else:
                        path = ridge_path(_columns(dg, g_rows[tr], b), y, alphas)
                    for a, (w, c) in zip(alphas, path, strict=True):
                        wd, wb = _head_part(dg, b, w, c)
                        oof[(a, b, g)][np.ix_(g_pos[te], group)] = predict(dg, g_rows[te], wd, wb)
    y = scores[rows]
    crit = {_key(*s): cv_rank(oof[s], y, fold_of) for s in settings}
    best = max(settings, key=lambda s: crit[_key(*s)])
    return CVResult(best[0], best[1], best[2], folds, crit, oof[best], fold_of)


# --- stacking -----------------------------------------------------------------------------
# The ridge head is one input of a per-model linear blend fitted on its out-of-fold predictions:
# y_j ~ c + a * difficulty logit + l * log length + s * ridge_j. Four coefficients per model are
# estimated well from a hundred outcomes, so with few outcomes (out-of-fold ridge predictions
# that are noise) s goes to 0 and the head falls back to the base bundle's ranking, and as the
# outcomes grow the fitted part takes over. The blend is linear in the features, so it folds
# into the same head.
def fit_stack(d: Design, rows: npt.NDArray[np.intp], scores: F64, oof: F64) -> F64:
    """Blend coefficients [4, models]: intercept, difficulty logit, length, ridge prediction
    (``oof``: out-of-fold ridge predictions of ``rows``, in ``rows``' order)."""
    m = scores.shape[1]
    coef = np.zeros((4, m))
    for j in range(m):
        ok = np.isfinite(scores[rows, j])
        if ok.sum() < 2:
            coef[3, j] = 1.0
            continue
        r = rows[ok]
        x = np.column_stack([np.ones(r.size), d.dense[r, PRIOR], d.dense[r, LENGTH], oof[ok, j]])
        y = scores[r, j]
        c = np.linalg.solve(x.T @ x + 1e-6 * np.eye(4), x.T @ y)
        if c[3] < 0:  # the ridge ranks the wrong way round: leave it out
            c = np.r_[np.linalg.solve(x[:, :3].T @ x[:, :3] + 1e-6 * np.eye(3), x[:, :3].T @ y), 0]
        coef[:, j] = c
    return coef


def stacked_oof(d: Design, rows: npt.NDArray[np.intp], oof: F64, coef: F64) -> F64:
    lin = coef[0] + np.outer(d.dense[rows, PRIOR], coef[1])
    lin += np.outer(d.dense[rows, LENGTH], coef[2]) + oof * coef[3]
    return np.asarray(np.clip(lin, 0.0, 1.0))


def apply_stack(head: Head, coef: F64) -> Head:
    """The ridge head blended with the prior and length terms (one linear head again)."""
    wd = head.wd * coef[3]
    wd[0] += coef[0]
    wd[PRIOR] += coef[1]
    wd[1 + LENGTH] += coef[2]
    return Head(wd, head.wb * coef[3])


# --- routing figures -----------------------------------------------------------------------
def model_pairs(scores: F64, models: Sequence[str], min_rows: int = 10) -> list[tuple[int, int]]:
    """(weak, strong) index pairs whose mean scores on shared prompts differ by >= MIN_GAP."""
    out = []
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            both = np.isfinite(scores[:, i]) & np.isfinite(scores[:, j])
            if both.sum() < min_rows:
                continue
            mi, mj = scores[both, i].mean(), scores[both, j].mean()
            if abs(mi - mj) >= MIN_GAP:
                out.append((i, j) if mi < mj else (j, i))
    return out


def pair_figures(
    scores: F64, routers: dict[str, F64 | None], models: Sequence[str], min_rows: int = 10
) -> dict[str, Any]:
    """APGR and calls@95 per (weak, strong) pair for each router; ``routers`` maps a name to
    per-model predictions [n, m] (routed by the predicted gain) or ``None`` entries skipped;
    a 1-d array is a router score (higher = send to the strong model)."""
    pairs = model_pairs(scores, models, min_rows)
    out: dict[str, Any] = {"pairs": {}, "mean": {}}
    sums: dict[str, list[float]] = {}
    for w, s in pairs:
        both = np.isfinite(scores[:, w]) & np.isfinite(scores[:, s])
        entry: dict[str, Any] = {
            "n": int(both.sum()),
            "quality_weak": round(float(scores[both, w].mean()), 4),
            "quality_strong": round(float(scores[both, s].mean()), 4),
        }
        for name, pred in routers.items():
            if pred is None:
                continue
            score = pred[both] if pred.ndim == 1 else pred[both, s] - pred[both, w]
            r = metrics.evaluate(score, scores[both, w], scores[both, s])
            entry[name] = {"apgr": round(r.apgr, 4), "calls_at_95": round(r.calls_at_95, 4)}
            sums.setdefault(name, []).append(r.apgr)
            sums.setdefault(name + "@95", []).append(r.calls_at_95)
        out["pairs"][f"{models[w]} -> {models[s]}"] = entry
    for name, vals in sums.items():
        key, _, tail = name.partition("@")
        out["mean"].setdefault(key, {})["calls_at_95" if tail else "apgr"] = round(
            float(np.mean(vals)), 4
        )
    return out


def fold_figures(
    outs: Outcomes, rows: npt.NDArray[np.intp], cv: CVResult, length: F64, difficulty: F64
) -> dict[str, Any]:
    """Mean over folds of each fold's figures (each fold is scored by its own model, so
    out-of-fold predictions of different folds are not ranked against each other)."""
    per = []
    for k in range(cv.folds):
        sel = np.flatnonzero(cv.fold_of == k)
        r = rows[sel]
        per.append(
            pair_figures(
                outs.scores[r],
                {"fitted": cv.oof[sel], "length": length[r], "default": difficulty[r]},
                outs.models,
                min_rows=5,
            )
        )
    pairs = model_pairs(outs.scores[rows], outs.models)
    names = {f"{outs.models[w]} -> {outs.models[s]}" for w, s in pairs}
    mean: dict[str, dict[str, float]] = {}
    for router in ("fitted", "length", "default"):
        for metric in ("apgr", "calls_at_95"):
            vals = [f["pairs"][p][router][metric] for f in per for p in names if p in f["pairs"]]
            if vals:
                mean.setdefault(router, {})[metric] = round(float(np.mean(vals)), 4)
    return {"pairs": sorted(names), "mean": mean}


# --- the whole fit -------------------------------------------------------------------------
def _holdout(text: str) -> bool:
    norm = re.sub(r"\s+", " ", text).strip().lower()
    h = int.from_bytes(hashlib.sha1(("holdout:" + norm).encode()).digest()[:8], "big") / 2**64
    return h < HOLDOUT_FRACTION


@dataclass(slots=True)
class FitResult:
    head: Head
    design: Design
    cv: CVResult
    figures: dict[str, Any]  # held-out
    cv_figures: dict[str, Any]  # out-of-fold on the fitting part
    beats_length: bool
    stack: F64  # [4, models]: intercept, difficulty logit, length, ridge weight
    n_prompts: int
    n_outcomes: int
    n_holdout: int
    seconds: dict[str, float] = field(default_factory=dict)


def fit(
    outs: Outcomes,
    featurizer: Featurizer | None = None,
    max_vocab: int = 2048,
    folds: int = 5,
    alphas: Sequence[float] = ALPHAS,
    betas: Sequence[float] = BETAS,
    gammas: Sequence[float] = GAMMAS,
) -> FitResult:
    """Cross-validate, measure on the held-out slice, refit on everything (see module doc)."""
    n = len(outs.texts)
    if n < MIN_PROMPTS or outs.scores.shape[1] < 1:
        raise TooFewOutcomes(
            f"{n} prompts with outcomes: at least {MIN_PROMPTS} are needed to fit anything"
        )
    t0 = time.perf_counter()
    feat = featurizer or Featurizer()
    dense, counts = feat(outs.texts)
    d = design(dense, counts, max_vocab)
    t_feat = time.perf_counter() - t0
    hold = np.array([_holdout(t) for t in outs.texts])
    if hold.sum() < 5 or (~hold).sum() < MIN_PROMPTS:  # tiny sets: hold out a fixed fifth
        hold = np.arange(n) % 5 == 4
    fit_rows, hold_rows = np.flatnonzero(~hold), np.flatnonzero(hold)
    cv = cross_validate(d, fit_rows, outs.scores, folds, alphas, betas, gammas=gammas)
    t_cv = time.perf_counter() - t0 - t_feat
    length = np.array([len(t) for t in outs.texts], dtype=np.float64)
    difficulty = dense[:, -8]  # the base bundle's difficulty logit
    stack = fit_stack(d, fit_rows, outs.scores, cv.oof)
    cv.oof = stacked_oof(d, fit_rows, cv.oof, stack)
    cv_fig = fold_figures(outs, fit_rows, cv, length, difficulty)
    part = apply_stack(fit_head(d, fit_rows, outs.scores, cv.alpha, cv.beta, cv.gamma), stack)
    held = predict(d, hold_rows, part.wd, part.wb)
    fig = pair_figures(
        outs.scores[hold_rows],
        {"fitted": held, "length": length[hold_rows], "default": difficulty[hold_rows]},
        outs.models,
        min_rows=5,
    )
    ok = np.isfinite(outs.scores[hold_rows])
    fig["mse"] = round(float(np.mean((held[ok] - outs.scores[hold_rows][ok]) ** 2)), 5)
    head = apply_stack(fit_head(d, np.arange(n), outs.scores, cv.alpha, cv.beta, cv.gamma), stack)
    means = cv_fig["mean"]
    beats = bool(cv_fig["pairs"]) and means["fitted"]["apgr"] > means["length"]["apgr"]
    return FitResult(
        head,
        d,
        cv,
        fig,
        cv_fig,
        beats,
        stack,
        n,
        outs.n_outcomes,
        len(hold_rows),
        {"features": t_feat, "cv": t_cv, "total": time.perf_counter() - t0},
    )


def verdict(res: FitResult) -> str:
    """One plain sentence on whether these outcomes are enough to beat the length router."""
    m = res.cv_figures["mean"]
    if not res.cv_figures["pairs"]:
        return (
            "too few outcomes to beat the length router: no two models have outcomes on 10 or "
            f"more shared prompts with mean scores {MIN_GAP} or more apart, so there is no "
            "routing decision to learn"
        )
    fitted, length = m["fitted"]["apgr"], m["length"]["apgr"]
    if res.beats_length:
        return (
            f"enough outcomes: cross-validated mean APGR {fitted:.3f} beats the length "
            f"router's {length:.3f}"
        )
    return (
        f"too few outcomes to beat the length router: with {res.n_outcomes} outcomes on "
        f"{res.n_prompts} prompts the cross-validated mean APGR ({fitted:.3f}) is not above "
        f"the length router's ({length:.3f})"
    )


def predict_texts(res: FitResult, featurizer: Featurizer, texts: Sequence[str]) -> F64:
    """Each model's expected score for new prompts (what the exported graph computes)."""
    dense, counts = featurizer(texts)
    d = res.design
    ntok = np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1.0)
    bag = sp.diags(1.0 / ntok) @ counts[:, d.vocab] @ sp.diags(d.weight)
    h = res.head
    lin = h.wd[0] + ((dense - d.mean) / d.scale) @ h.wd[1:] + np.asarray(bag @ h.wb)
    return np.asarray(np.clip(lin, 0.0, 1.0))


# --- export --------------------------------------------------------------------------------
def _const(model: onnx.ModelProto, name: str, value: npt.ArrayLike, dtype: type) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def head_graph(base: Bundle, res: FitResult, vocab_size: int) -> onnx.ModelProto:
    """The base graph plus ``predicted`` = clip(dense-head + bag-head, 0, 1) [batch, models]."""
    model = onnx.load(str(base.model_path))
    g = model.graph
    d, h = res.design, res.head
    m = h.wd.shape[1]
    # fold the standardisation: ((f - mean) / scale) @ W + b == f @ (W / scale) + b'
    w = h.wd[1:] / d.scale[:, None]
    b = h.wd[0] - (d.mean / d.scale) @ h.wd[1:]
    nodes = [
        _feature_nodes(model),
        helper.make_node("MatMul", [FEATURES, _const(model, "fit/w", w, np.float32)], ["fit/mm"]),
        helper.make_node("Add", ["fit/mm", _const(model, "fit/b", b, np.float32)], ["fit/lin"]),
    ]
    total = "fit/lin"
    if np.any(h.wb != 0):
        table = np.zeros((vocab_size, m), dtype=np.float32)
        table[d.vocab] = h.wb * d.weight[:, None]
        ax1 = _const(model, "fit/ax1", [1], np.int64)
        nodes += [
            helper.make_node(
                "Gather",
                [_const(model, "fit/table", table, np.float32), "input_ids"],
                ["fit/rows"],
                axis=0,
            ),
            helper.make_node("Cast", ["attention_mask"], ["fit/maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["fit/maskf", ax1], ["fit/mask3"]),
            helper.make_node("MatMul", ["fit/mask3", "fit/rows"], ["fit/sum3"]),
            helper.make_node("Squeeze", ["fit/sum3", ax1], ["fit/sum"]),
            helper.make_node("ReduceSum", ["fit/maskf", ax1], ["fit/n"], keepdims=1),
            helper.make_node(
                "Max", ["fit/n", _const(model, "fit/one", [1.0], np.float32)], ["fit/n1"]
            ),
            helper.make_node("Div", ["fit/sum", "fit/n1"], ["fit/bag"]),
            helper.make_node("Add", ["fit/lin", "fit/bag"], ["fit/total"]),
        ]
        total = "fit/total"
    nodes.append(
        helper.make_node(
            "Clip",
            [
                total,
                _const(model, "fit/lo", 0.0, np.float32),
                _const(model, "fit/hi", 1.0, np.float32),
            ],
            ["predicted"],
        )
    )
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info("predicted", TensorProto.FLOAT, ["batch", m]))
    model.doc_string = "switchyard fitted router: base graph + per-model expected-score head"
    onnx.checker.check_model(model)
    return model


def _r(x: float) -> float:
    return round(float(x), 4)


def write_bundle(
    out: Path,
    res: FitResult,
    outs: Outcomes,
    featurizer: Featurizer,
    name: str,
    command: str,
) -> None:
    """The bundle directory: ``model.onnx``, ``tokenizer.json`` and ``router.yaml``."""
    base = featurizer.bundle
    out.mkdir(parents=True, exist_ok=True)
    model = head_graph(base, res, featurizer.vocab)
    tmp = out / "model.onnx.tmp"
    onnx.save(model, str(tmp))
    shutil.copyfile(base.tokenizer_path, out / "tokenizer.json")
    doc = dict(base.meta)
    now = dt.datetime.now(dt.UTC)
    doc["name"] = name
    doc["version"] = now.strftime("%Y.%m.%d.%H%M%S")
    doc["outputs"] = {**base.outputs, "predicted": "predicted"}
    doc["labels"] = {**doc.get("labels", {}), "models": list(outs.models)}
    doc["labels"]["predicted"] = "each model's expected score in [0, 1] for the prompt"
    doc["fit"] = {
        "base": f"{featurizer.base} ({base.name}@{base.version}, model.onnx sha256 "
        f"{sha256_file(base.model_path)})",
        "head": "ridge per model on [standardised base features + difficulty logit + category "
        "probabilities | beta x token bag (count/n x idf)], blended per model with the "
        "difficulty logit and log length (coefficients fitted on out-of-fold predictions), "
        "clipped to [0, 1]",
        "blend": {
            m: {
                "intercept": _r(res.stack[0, j]),
                "difficulty_logit": _r(res.stack[1, j]),
                "length": _r(res.stack[2, j]),
                "ridge": _r(res.stack[3, j]),
            }
            for j, m in enumerate(outs.models)
        },
        "vocab": int(res.design.vocab.size),
        "cv": {
            "folds": res.cv.folds,
            "criterion": "out-of-fold correlation of the predicted and observed score gap of "
            "every pair of models, mean over folds (alpha/beta/gamma -> correlation; gamma: "
            "weight of the base's difficulty logit, whose penalty is alpha / gamma^2)",
            "alpha": res.cv.alpha,
            "beta": res.cv.beta,
            "gamma": res.cv.gamma,
            "errors": {k: round(v, 5) for k, v in res.cv.criterion.items()},
        },
    }
    doc["training"] = {
        "command": command,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "outcomes": {
            "files": dict(outs.files),
            "records": outs.n_records,
            "outcomes": res.n_outcomes,
            "prompts": res.n_prompts,
            "per_model": {
                m: int(np.isfinite(outs.scores[:, j]).sum()) for j, m in enumerate(outs.models)
            },
        },
        "seconds": {k: round(v, 2) for k, v in res.seconds.items()},
        "base_training": base.meta.get("training", {}),
    }
    doc["evaluation"] = {
        "held_out": {
            "what": f"{HOLDOUT_FRACTION:.0%} of prompts (hash of the text), scored by a head "
            "fitted on the rest with the chosen settings; the bundle's head is refitted on all",
            "prompts": res.n_holdout,
            **res.figures,
        },
        "cross_validated": {
            "mean": res.cv_figures["mean"],
            "beats_length": res.beats_length,
            "verdict": verdict(res),
        },
    }
    (out / "router.yaml.tmp").write_text(
        yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8"
    )
    # model first, yaml last: a watcher that reloads on router.yaml sees a complete bundle
    tmp.replace(out / "model.onnx")
    (out / "router.yaml.tmp").replace(out / "router.yaml")
