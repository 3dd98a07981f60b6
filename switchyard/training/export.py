"""Write router graphs as ONNX (one graph per bundle; built with the ``onnx`` helper API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
F32 = npt.NDArray[np.float32]


class _G:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base: str, value: npt.ArrayLike, dtype: type = np.float32) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out


def _heads(
    g: _G,
    x: str,
    diff: tuple[F32, float],
    cat: tuple[F32, F32],
    hidden: tuple[F32, F32, F32] | None,
) -> None:
    """difficulty = sigmoid(x w + b [+ relu(x W1 + b1) w2]) (an MLP with a linear skip, as in
    ``static_graph``); categories = softmax(x @ Wc + bc)."""
    w, b = diff
    z = g.op("Add", [g.op("MatMul", [x, g.const("wd", w.reshape(-1, 1))]), g.const("bd", [b])])
    if hidden is not None:
        w1, b1, w2 = hidden
        h = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.const("w1", w1)]), g.const("b1", b1)])])
        z = g.op("Add", [z, g.op("MatMul", [h, g.const("w2", w2.reshape(-1, 1))])])
    p = g.op("Sigmoid", [z])
    g.op("Reshape", [p, g.const("shape", [-1], np.int64)], out="difficulty")
    wc, bc = cat
    zc = g.op("Add", [g.op("MatMul", [x, g.const("wc", wc)]), g.const("bc", bc)])
    g.op("Softmax", [zc], out="categories", axis=-1)


def _save(g: _G, inputs: list[onnx.ValueInfoProto], path: Path, n_cat: int, doc: str) -> None:
    outputs = [
        helper.make_tensor_value_info("difficulty", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("categories", TensorProto.FLOAT, ["batch", n_cat]),
    ]
    graph = helper.make_graph(g.nodes, "switchyard_router", inputs, outputs, g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="switchyard"
    )
    model.ir_version = 8
    model.doc_string = doc
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def static_graph(
    path: Path,
    table: npt.NDArray[np.float16],
    dim: int,
    n_extra: int,
    mean: F32,
    scale: F32,
    diff: tuple[F32, float],
    cat: tuple[F32, F32],
    hidden: tuple[F32, F32, F32] | None = None,
) -> None:
    """Token ids -> scores in one graph, built for batch-1 latency (about 20 ops).

    ``table`` rows are ``[w_t * e_t (dim), 1, class indicators (n_extra)]`` per token id. One
    MatMul of the mask row [B, 1, T] with the gathered rows [B, T, D] sums them (onnxruntime's
    ReduceSum over the middle axis costs 5x more): the L2-normalised first ``dim`` columns are
    the SIF-weighted mean embedding (the 1 / sum(w) factor cancels in the normalisation), the
    next one is the token count ``n`` (log-length features), the rest divided by ``n`` are the
    token-class fractions. Features ``x = [vec, log(n+1)/6, (log(n+1)/6)^2, fractions]`` are
    standardised with ``mean``/``scale``; the standardisation and the 1/6 are folded into the
    head weights. Heads: difficulty = sigmoid(x w + b [+ relu(x W1 + b1) w2]), categories =
    softmax(x Wc + bc).
    """
    g = _G()
    # Stored as float16 (half the file); only the rows gathered are cast. A Cast of the whole
    # table first is folded by onnxruntime into a float32 copy kept beside the float16 one: 16
    # MiB more per session for the default bundle, for runs as fast on short prompts and about
    # 7 % faster on 512-token ones (measured in docs/performance.md).
    emb = g.op(
        "Cast",
        [g.op("Gather", [g.const("table", table, np.float16), "input_ids"], axis=0)],
        to=TensorProto.FLOAT,
    )  # [B, T, D]
    mask = g.op(
        "Unsqueeze",
        [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT), g.const("ax1", [1], np.int64)],
    )  # [B, 1, T]
    sums = g.op("Squeeze", [g.op("MatMul", [mask, emb]), g.const("ax1", [1], np.int64)])

    def cols(a: int, b: int) -> str:
        return g.op(
            "Slice",
            [
                sums,
                g.const("s", [a], np.int64),
                g.const("e", [b], np.int64),
                g.const("a", [1], np.int64),
            ],
        )

    eps = g.const("eps", [1e-9])
    vec = cols(0, dim)
    vec = g.op("Div", [vec, g.op("Max", [g.op("ReduceL2", [vec], axes=[1], keepdims=1), eps])])
    n = cols(dim, dim + 1)
    frac = g.op("Div", [cols(dim + 1, dim + 1 + n_extra), g.op("Max", [n, g.const("one", [1.0])])])
    ln = g.op("Log", [g.op("Add", [n, g.const("one", [1.0])])])  # log(n+1); the /6 is folded
    x = g.op("Concat", [vec, ln, g.op("Mul", [ln, ln]), frac], axis=1)
    # fold standardisation ((x - mean) / scale) and the 1/6, 1/36 of the length terms into
    # the weights: x_std @ W + b == x @ (W / s) + (b - (mean / s) @ W)
    s = scale.astype(np.float64).copy()
    s[dim] *= 6.0
    s[dim + 1] *= 36.0
    mu = mean.astype(np.float64) / scale.astype(np.float64)

    def fold(w: F32, b: F32 | float) -> tuple[F32, F32]:
        w64 = np.asarray(w, np.float64)
        return (w64 / s.reshape((-1,) + (1,) * (w64.ndim - 1))).astype(np.float32), (
            np.asarray(b, np.float64) - mu @ w64
        ).astype(np.float32)

    w, b = diff
    wd, bd = fold(w.reshape(-1, 1), np.array([b]))
    z = g.op("Add", [g.op("MatMul", [x, g.const("wd", wd)]), g.const("bd", bd)])
    if hidden is not None:
        w1, b1, w2 = hidden
        fw1, fb1 = fold(w1, b1)
        h = g.op(
            "Relu", [g.op("Add", [g.op("MatMul", [x, g.const("w1", fw1)]), g.const("b1", fb1)])]
        )
        z = g.op("Add", [z, g.op("MatMul", [h, g.const("w2", w2.reshape(-1, 1))])])
    g.op("Reshape", [g.op("Sigmoid", [z]), g.const("shape", [-1], np.int64)], out="difficulty")
    wc, bc = fold(*cat)
    zc = g.op("Add", [g.op("MatMul", [x, g.const("wc", wc)]), g.const("bc", bc)])
    g.op("Softmax", [zc], out="categories", axis=-1)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
    ]
    _save(g, inputs, path, cat[1].shape[0], "switchyard static-embedding router")


def head_graph(
    path: Path,
    mean: F32,
    scale: F32,
    diff: tuple[F32, float],
    cat: tuple[F32, F32],
    hidden: tuple[F32, F32, F32] | None = None,
) -> None:
    """Pooled sentence embedding [B, 384] + token count [B, 1] -> scores (the encoder head;
    the difficulty head is logistic, or with ``hidden`` the same skip MLP as the default's)."""
    g = _G()
    ln = g.op(
        "Div",
        [g.op("Log", [g.op("Add", ["n_tokens", g.const("one", [1.0])])]), g.const("six", [6.0])],
    )
    norm = g.op(
        "Max", [g.op("ReduceL2", ["embedding"], axes=[1], keepdims=1), g.const("eps", [1e-9])]
    )
    x = g.op("Concat", [g.op("Div", ["embedding", norm]), ln, g.op("Mul", [ln, ln])], axis=1)
    x = g.op("Div", [g.op("Sub", [x, g.const("mu", mean)]), g.const("sd", scale)])
    _heads(g, x, diff, cat, hidden)
    inputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 384]),
        helper.make_tensor_value_info("n_tokens", TensorProto.FLOAT, ["batch", 1]),
    ]
    _save(g, inputs, path, cat[1].shape[0], "switchyard MiniLM-embedding router head")
