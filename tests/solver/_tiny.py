"""A tiny Input-fed net (InnerProduct + EuclideanLoss) and solver files for the solver unit tests,
plus an independent numpy model of Caffe's update rules (written from caffe-semantics.md C.3)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

NET = """
name: "tiny"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
"""

RNG = np.random.default_rng(7)
X = RNG.normal(size=(4, 3)).astype(np.float32)
Y = RNG.normal(size=(4, 2)).astype(np.float32)


def write_case(d: Path, solver_text: str, net_text: str = NET) -> Path:
    (d / "net.prototxt").write_text(net_text)
    (d / "solver.prototxt").write_text('net: "net.prototxt"\n' + solver_text +
                                       f'\nsnapshot_prefix: "{d / "snap"}"\n')
    return d / "solver.prototxt"


def feed(solver, x: np.ndarray = X, y: np.ndarray = Y) -> None:
    solver.net.blobs["x"].data[...] = x
    solver.net.blobs["y"].data[...] = y


def f32(v: float) -> float:
    return float(np.float32(v))


def numpy_train(w: np.ndarray, b: np.ndarray, kind: str, iters: int, *, base_lr: float, momentum: float = 0.0,
                momentum2: float = 0.999, delta: float = 1e-8, rms_decay: float = 0.99,
                weight_decay: float = 0.0, reg: str = "L2", lr_at=None) -> tuple[np.ndarray, np.ndarray, list]:
    """Train the tiny net in float64 numpy with Caffe's formulas; returns final (w, b) and losses."""
    params = [w.astype(np.float64), b.astype(np.float64)]
    lr_mult, decay_mult = [1.0, 2.0], [1.0, 0.0]
    hist = [np.zeros_like(p) for p in params]
    hist2 = [np.zeros_like(p) for p in params]
    x, y = X.astype(np.float64), Y.astype(np.float64)
    n = x.shape[0]
    losses = []
    for it in range(iters):
        pred = x @ params[0].T + params[1]
        diff = pred - y
        losses.append(float((diff**2).sum() / (2 * n)))
        dp = diff / n
        grads = [dp.T @ x, dp.sum(0)]
        rate = base_lr if lr_at is None else lr_at(it)
        for i, (p, g) in enumerate(zip(params, grads)):
            decay = weight_decay * decay_mult[i]
            g = g + (decay * p if reg == "L2" else decay * np.sign(p))
            lr = rate * lr_mult[i]
            if kind == "SGD":
                hist[i] = momentum * hist[i] + lr * g
                upd = hist[i]
            elif kind == "Nesterov":
                old = hist[i].copy()
                hist[i] = momentum * hist[i] + lr * g
                upd = (1 + momentum) * hist[i] - momentum * old
            elif kind == "AdaGrad":
                hist[i] = hist[i] + g * g
                upd = lr * g / (np.sqrt(hist[i]) + delta)
            elif kind == "RMSProp":
                hist[i] = rms_decay * hist[i] + (1 - rms_decay) * g * g
                upd = lr * g / (np.sqrt(hist[i]) + delta)
            elif kind == "AdaDelta":
                hist[i] = momentum * hist[i] + (1 - momentum) * g * g
                u = g * np.sqrt((hist2[i] + delta) / (hist[i] + delta))
                hist2[i] = momentum * hist2[i] + (1 - momentum) * u * u
                upd = lr * u
            elif kind == "Adam":
                t = it + 1
                hist[i] = momentum * hist[i] + (1 - momentum) * g
                hist2[i] = momentum2 * hist2[i] + (1 - momentum2) * g * g
                upd = lr * math.sqrt(1 - momentum2**t) / (1 - momentum**t) * hist[i] / (np.sqrt(hist2[i]) + delta)
            else:
                raise ValueError(kind)
            params[i] = p - upd
    return params[0], params[1], losses
