"""Shared helpers of the layer tests: build one layer from text params, and a finite-difference
gradient check (Caffe's GradientChecker idea) in float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from caffeport.layers.base import TEST, BuildContext, Layer, layer_class
from caffeport.proto import caffe_pb2


def make(type_name: str, params: str, bottom_shapes: Sequence[Sequence[int]], ntop: int = 1, phase: int = TEST,
         root: Path | None = None, name: str = "L") -> Layer:
    """A ``type_name`` layer from its text-format params, with bottoms b0.. and tops t0.."""
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(params, lp)
    lp.name = name
    lp.type = type_name
    lp.bottom.extend(f"b{i}" for i in range(len(bottom_shapes)))
    lp.top.extend(f"t{i}" for i in range(ntop))
    ctx = BuildContext(phase=phase, root=root) if root is not None else BuildContext(phase=phase)
    return layer_class(type_name)(lp, [tuple(s) for s in bottom_shapes], ctx)


def fd_check(layer: Layer, inputs: list[torch.Tensor], check: tuple[int, ...] | None = None,
             step: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-5, seed: int = 0) -> None:
    """Autograd gradients of ``sum(w * top)`` (random w) w.r.t. the checked inputs and every
    learnable blob against central finite differences, in float64."""
    layer = layer.double()
    check = tuple(range(len(inputs))) if check is None else check
    xs = [x.detach().double().clone().requires_grad_(i in check) for i, x in enumerate(inputs)]
    gen = torch.Generator().manual_seed(seed)

    def tops() -> tuple[torch.Tensor, ...]:
        out = layer(*xs)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    ws = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in tops()]

    def objective() -> torch.Tensor:
        return sum((o * w).sum() for o, w in zip(tops(), ws))

    params = [p for p in layer.blobs if p.requires_grad]
    for p in params:
        p.grad = None
    objective().backward()
    targets = [xs[i] for i in check] + params
    assert targets, "nothing to check"
    analytic = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in targets]
    for t, a in zip(targets, analytic):
        num = fd_grad(objective, t, step)
        np.testing.assert_allclose(a.reshape(-1).numpy(), num.reshape(-1), atol=atol, rtol=rtol)


def fd_grad(f: Callable[[], torch.Tensor], x: torch.Tensor, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar ``f()`` with respect to every element of ``x``."""
    g = np.zeros(tuple(x.shape))
    flat = x.data.view(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            fp = float(f())
            flat[i] = old - eps
            fm = float(f())
            flat[i] = old
            g.reshape(-1)[i] = (fp - fm) / (2 * eps)
    return g
