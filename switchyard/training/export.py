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
    g: _G, x: str, diff: tuple[F32, float], cat: tuple[F32, F32], hidden: tuple[F32, F32] | None
) -> None:
    """difficulty = sigmoid(h @ w + b) (h = relu(x W1 + b1) when there is a hidden layer);
    categories = softmax(x @ Wc + bc)."""
    h = x
    if hidden is not None:
        w1, b1 = hidden
        h = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.const("w1", w1)]), g.const("b1", b1)])])
    w, b = diff
    z = g.op("Add", [g.op("MatMul", [h, g.const("wd", w.reshape(-1, 1))]), g.const("bd", [b])])
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
    hidden: tuple[F32, F32] | None = None,
) -> None:
    """Token ids -> scores in one graph.

    ``table`` rows are ``[w_t * e_t (dim), w_t, class indicators (n_extra)]`` per token id:
    the weighted mean of ``e_t`` is the prompt embedding (L2-normalised), the plain mean of the
    indicators gives token-class fractions, and the token count gives log-length features.
    Features are standardised with ``mean``/``scale`` before the heads.
    """
    g = _G()
    # stored as float16 (half the file); onnxruntime folds the Cast into a float32 table at load
    table32 = g.op("Cast", [g.const("table", table, np.float16)], to=TensorProto.FLOAT)
    emb = g.op("Gather", [table32, "input_ids"], axis=0)
    mask = g.op(
        "Unsqueeze",
        [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT), g.const("ax2", [2], np.int64)],
    )
    sums = g.op("ReduceSum", [g.op("Mul", [emb, mask]), g.const("ax1", [1], np.int64)], keepdims=0)
    n = g.op("ReduceSum", [mask, g.const("ax1", [1], np.int64)], keepdims=0)  # [B, 1]

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
    vec = g.op("Div", [cols(0, dim), g.op("Max", [cols(dim, dim + 1), eps])])
    norm = g.op("Max", [g.op("ReduceL2", [vec], axes=[1], keepdims=1), eps])
    vec = g.op("Div", [vec, norm])
    n1 = g.op("Max", [n, g.const("one", [1.0])])
    frac = g.op("Div", [cols(dim + 1, dim + 1 + n_extra), n1])
    ln = g.op(
        "Div", [g.op("Log", [g.op("Add", [n, g.const("one", [1.0])])]), g.const("six", [6.0])]
    )
    ln2 = g.op("Mul", [ln, ln])
    x = g.op("Concat", [vec, ln, ln2, frac], axis=1)
    x = g.op("Div", [g.op("Sub", [x, g.const("mu", mean)]), g.const("sd", scale)])
    _heads(g, x, diff, cat, hidden)
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
    hidden: tuple[F32, F32] | None = None,
) -> None:
    """Pooled sentence embedding [B, 384] + token count [B, 1] -> scores (the encoder head)."""
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
