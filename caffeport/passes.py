"""Inference graph passes over a resolved net (one place for every fold/fusion caffeport does).

``optimize_net(net)`` takes a built TEST-phase :class:`caffeport.Net` (NetParameter + weights) and
returns an equivalent, smaller Net plus a :class:`PassReport`:

- **fold**: a per-channel affine layer (BatchNorm with global stats, Scale, Bias, Power with
  ``power: 1``, PSPNet's BN, TEST-phase Dropout) whose bottom is the private output of a
  Convolution / ConvolutionDepthwise / InnerProduct is folded into that layer's weights and bias
  (``W' = a W``, ``b' = a b + s``; a bias is added when the conv had ``bias_term: false``);
- **drop**: such a layer that is exactly the identity (Dropout at TEST) is removed wherever it is;
- **ReLU fusion** is left to the compiler (inductor fuses conv+ReLU once the BatchNorm/Scale between
  them are gone); the report counts the conv/fc -> ReLU pairs that became adjacent.

The affine map of a layer is never re-derived here: it is *measured* from the layer's own forward
(outputs at 0 and 1, then checked on a random input), so the folded numbers are exactly the layer's
semantics (Caffe's ``1/scale_factor`` rule, eps, ``scale_train``...). A layer whose measurement is not
per-channel affine (BatchNorm with batch statistics, Power with ``power: 2``...) is left alone.
Only the two type tables below name layer types. Folding changes fp32 rounding (not the maths): the
folded net agrees with the exact one to ~1e-6 relative, not bit for bit as Caffe's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from caffeport.proto import caffe_pb2

__all__ = ["FOLD_INTO", "AFFINE_CANDIDATES", "PassReport", "optimize_net", "optimize_param"]

# Layers whose output channel o is ``sum(W[o] * x) + b[o]``: the folding targets.
FOLD_INTO = {"Convolution", "ConvolutionDepthwise", "InnerProduct"}
# Single-bottom layers that may be per-channel affine at TEST (each is measured before folding).
AFFINE_CANDIDATES = {"BatchNorm", "Scale", "Bias", "Power", "Dropout", "BN"}
_RELU = {"ReLU"}


@dataclass
class PassReport:
    """What the passes did: folded ``(layer, into)`` pairs, dropped identity layers, ReLU pairs."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    relu_pairs: int = 0
    layers_before: int = 0
    layers_after: int = 0

    def summary(self) -> str:
        return (f"{self.layers_before} -> {self.layers_after} layers: {len(self.folded)} folded into "
                f"conv/fc, {len(self.dropped)} identity layers dropped, {self.relu_pairs} conv/fc+ReLU pairs")


def _probe_affine(layer: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(a, s)`` per channel (axis 1) when ``layer(x) == a * x + s`` elementwise, else None.
    Measured on a batch of one; the layer's state (blobs, buffers) is restored afterwards."""
    if len(shape) < 2:
        return None
    shape = (1, *shape[1:])
    c = shape[1]
    saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    try:
        with torch.no_grad():
            f0 = layer(torch.zeros(shape))
            f1 = layer(torch.ones(shape))
            gen = torch.Generator().manual_seed(1234)
            x = torch.randn(shape, generator=gen) * 3.0
            y = layer(x)
    except Exception:
        return None
    finally:
        with torch.no_grad():
            for k, v in layer.state_dict().items():
                v.copy_(saved[k])
    if not all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape for t in (f0, f1, y)):
        return None
    f0 = f0.double().reshape(c, -1)
    a_full = f1.double().reshape(c, -1) - f0
    a = a_full.mean(dim=1)
    s = f0.mean(dim=1)
    scale = float(max(a.abs().max(), s.abs().max(), 1e-30))
    if (a_full - a[:, None]).abs().max() > 1e-6 * scale or (f0 - s[:, None]).abs().max() > 1e-6 * scale:
        return None
    pred = a[:, None] * x.double().reshape(c, -1) + s[:, None]
    bound = 1e-5 * ((a[:, None] * x.double().reshape(c, -1)).abs() + s.abs()[:, None]) + 1e-7 * scale
    if not bool(((y.double().reshape(c, -1) - pred).abs() <= bound).all()):
        return None
    return a.numpy(), s.numpy()


def _shared_names(net_param: caffe_pb2.NetParameter) -> set[str]:
    seen: dict[str, int] = {}
    for lp in net_param.layer:
        for spec in lp.param:
            if spec.name:
                seen[spec.name] = seen.get(spec.name, 0) + 1
    return {n for n, k in seen.items() if k > 1}


def _versions(layers: list[caffe_pb2.LayerParameter]) -> tuple[list[list[int]], dict[tuple[str, int], list[int]]]:
    """For each layer, the index of the layer that produced each bottom's current version (-1: none),
    and the readers of each version ``(blob, producer index)``."""
    current: dict[str, int] = {}
    producers: list[list[int]] = []
    readers: dict[tuple[str, int], list[int]] = {}
    for i, lp in enumerate(layers):
        prods = []
        for b in lp.bottom:
            p = current.get(b, -1)
            prods.append(p)
            readers.setdefault((b, p), []).append(i)
        producers.append(prods)
        for t in lp.top:
            current[t] = i
    return producers, readers


def _fold_target_ok(layer: Any, lp: caffe_pb2.LayerParameter, shared: set[str]) -> bool:
    if lp.type not in FOLD_INTO or len(lp.bottom) != 1 or len(lp.top) != 1:
        return False
    if any(spec.name in shared for spec in lp.param if spec.name):
        return False
    return int(getattr(layer, "axis", 1)) == 1


def _as_input(lp: caffe_pb2.LayerParameter, shapes: dict[str, tuple[int, ...]]) -> caffe_pb2.LayerParameter:
    """An ``Input`` layer with the tops (and shapes) of a data layer: its batches are fed by the caller."""
    new = caffe_pb2.LayerParameter(name=lp.name, type="Input")
    new.top.extend(lp.top)
    for t in lp.top:
        new.input_param.shape.add().dim.extend(int(d) for d in shapes[t])
    return new


def optimize_param(net: Any, *, fold: bool = True, drop_identity: bool = True, data_as_input: bool = False
                   ) -> tuple[caffe_pb2.NetParameter, dict[str, list[np.ndarray]], PassReport]:
    """Run the passes on a built TEST-phase ``Net``: returns ``(net_param, weights, report)`` where
    ``net_param`` is the rewritten (filtered, split-free) NetParameter and ``weights`` holds every
    layer's blobs (``{layer: [ndarray]}``, as a caffemodel). The input Net is not modified."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net.net_param)
    weights: dict[str, list[np.ndarray]] = {k: [a.copy() for a in v] for k, v in net.state_blobs().items()}
    built = net.layer_dict
    if data_as_input:  # data layers -> Input layers (their batches come from the exact net's readers)
        layers = [_as_input(lp, net._shapes) if (lp.name in built and built[lp.name].is_data
                                                 and not built[lp.name].is_input) else lp for lp in out.layer]
    else:
        layers = list(out.layer)
    shapes = net._shapes
    shared = _shared_names(out)
    report = PassReport(layers_before=len(layers))
    if net.phase != caffe_pb2.TEST:
        raise ValueError("optimize_param: the inference passes need a TEST-phase net")
    probes: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    changed = True
    while changed:
        changed = False
        producers, readers = _versions(layers)
        final_blobs = {t for lp in layers for t in lp.top} - {b for lp in layers for b in lp.bottom}
        for j, lp in enumerate(layers):
            if lp.type not in AFFINE_CANDIDATES or len(lp.bottom) != 1 or len(lp.top) != 1:
                continue
            if any(w != 0 for w in lp.loss_weight) or lp.name not in built:
                continue
            b, t = lp.bottom[0], lp.top[0]
            if b not in shapes:
                continue
            if lp.name not in probes:
                # A small spatial extent first (cheap), the real one when the layer needs it.
                full = tuple(shapes[b])
                small = full[:2] + tuple(min(d, 3) for d in full[2:])
                probes[lp.name] = _probe_affine(built[lp.name], small)
                if probes[lp.name] is None and small != full:
                    probes[lp.name] = _probe_affine(built[lp.name], full)
            affine = probes[lp.name]
            if affine is None:
                continue
            a, s = affine
            pi = producers[j][0]
            target = layers[pi] if pi >= 0 else None
            if (fold and target is not None and readers.get((b, pi)) == [j] and target.top[0] == b
                    and _fold_target_ok(built.get(target.name), target, shared)):
                _fold(target, built[target.name], weights, a, s)
                if t != b:
                    target.top[0] = t
                del layers[j]
                report.folded.append((lp.name, target.name))
                changed = True
                break
            if drop_identity and np.all(a == 1.0) and np.all(s == 0.0):
                if t == b:
                    del layers[j]
                    report.dropped.append(lp.name)
                    changed = True
                    break
                later = layers[j + 1:]
                if t not in final_blobs and not any(b in x.top for x in later) and not any(t in x.top for x in later):
                    for x in later:
                        for k, name in enumerate(x.bottom):
                            if name == t:
                                x.bottom[k] = b
                    del layers[j]
                    report.dropped.append(lp.name)
                    changed = True
                    break
    del out.layer[:]
    out.layer.extend(layers)
    for lp in layers:
        weights.setdefault(lp.name, [])
    weights = {lp.name: weights[lp.name] for lp in layers if weights.get(lp.name)}
    producers, readers = _versions(layers)
    for j, lp in enumerate(layers):
        if lp.type in _RELU and producers[j] and producers[j][0] >= 0 and layers[producers[j][0]].type in FOLD_INTO:
            report.relu_pairs += 1
    report.layers_after = len(layers)
    return out, weights, report


def _fold(lp: caffe_pb2.LayerParameter, layer: Any, weights: dict[str, list[np.ndarray]],
          a: np.ndarray, s: np.ndarray) -> None:
    """``W' = a W``, ``b' = a b + s`` on the output channels of a conv / fc (float64 maths, fp32 blobs)."""
    blobs = weights[lp.name]
    w = blobs[0].astype(np.float64)
    transpose = lp.type == "InnerProduct" and bool(lp.inner_product_param.transpose)
    if transpose:
        w = w * a[None, :]
    else:
        w = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
    has_bias = len(blobs) > 1
    bias = blobs[1].astype(np.float64).reshape(-1) if has_bias else np.zeros(a.shape[0])
    new_bias = a * bias + s
    blobs[0] = w.astype(np.float32)
    if has_bias or np.any(new_bias != 0):
        bshape = blobs[1].shape if has_bias else (a.shape[0],)
        if len(blobs) > 1:
            blobs[1] = new_bias.astype(np.float32).reshape(bshape)
        else:
            blobs.append(new_bias.astype(np.float32).reshape(bshape))
        if lp.type == "InnerProduct":
            lp.inner_product_param.bias_term = True
        else:
            lp.convolution_param.bias_term = True


def optimize_net(net: Any, *, fold: bool = True, drop_identity: bool = True, data_as_input: bool = False
                 ) -> tuple[Any, PassReport]:
    """The passes as a new TEST-phase ``Net`` (same inputs, input shapes and output names;
    ``data_as_input``: data layers become Input layers of the same tops)."""
    param, weights, report = optimize_param(net, fold=fold, drop_identity=drop_identity,
                                            data_as_input=data_as_input)
    new = net.rebuilt(param, weights)
    reshaped = False
    for name in new.inputs:
        if name not in net.inputs:
            continue
        want = tuple(net.blobs[name].shape)
        if tuple(new.blobs[name].shape) != want:
            new.blobs[name].reshape(*want)
            reshaped = True
    if reshaped:
        new.reshape()
    return new, report
