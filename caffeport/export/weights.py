"""Weights as plain named arrays for other frameworks: an ``.npz`` of ``"<layer>/<kind>"`` arrays.

:func:`export_weights` writes every parameter blob of a net with ``np.savez`` (no pickles: the file
loads with ``np.load(path, allow_pickle=False)``), atomically (temp file, then ``os.replace``).
Keys are ``"<Caffe layer name>/<kind>"``; layer names may contain ``/`` themselves (GoogLeNet's
``inception_3a/1x1``), so split a key on its LAST ``/``. Kinds:

=====================================================  ============================================
layer type                                             kinds
=====================================================  ============================================
Convolution, Deconvolution, ConvolutionDepthwise,      ``kernel``, ``bias`` (when ``bias_term``)
InnerProduct, Embed
Scale                                                  ``gamma`` (the scale), ``beta`` (``bias_term``;
                                                       the only kind when the scale is a 2nd bottom)
Bias                                                   ``bias``
BatchNorm                                              ``mean``, ``var``
BN (PSPNet)                                            ``gamma``, ``beta``, ``mean``, ``var``, each (C,)
PReLU                                                  ``alpha`` (Keras's name; (C,) or 0-d shared)
Normalize (SSD)                                        ``scale``
anything else (LSTM, RNN, Parameter, Python...)        ``"0"``, ``"1"``...: the blob index, as stored
=====================================================  ============================================

BatchNorm: Caffe stores ``[mean_sum, var_sum, scale_factor]`` and normalises with
``blob / scale_factor``; ``mean``/``var`` are the statistics with that factor ALREADY DIVIDED OUT
(0 when the factor is 0, as Caffe), ready for e.g. Keras's ``moving_mean``/``moving_variance``. The
epsilon is not a weight: it is ``batch_norm_param.eps`` in the prototxt (default 1e-5; Keras's
BatchNormalization defaults to 1e-3, so set ``epsilon`` explicitly). Caffe's BatchNorm has no affine
part: the ``gamma``/``beta`` usually live in the Scale layer that follows it.

Layouts (``layout=``):

- ``"caffe"``: Caffe's own shapes (conv ``(O, I/g, kh, kw)``, deconv ``(I, O/g, kh, kw)``,
  InnerProduct ``(N, K)``, or ``(K, N)`` when ``transpose: true``). :func:`weights_to_blobs` turns
  such a file back into the ``{layer: [blobs]}`` that ``Net.copy_from`` takes (partial loading:
  layers absent from the file keep their values, layers absent from the net are ignored - e.g. a
  "notop" net cut with ``caffeport truncate`` takes the conv weights of the full net's file).
- ``"channels_last"`` (TensorFlow / Keras, NHWC):

  * Convolution ``(O, I/g, kh, kw)`` -> Conv2D ``(kh, kw, I/g, O)`` (1-D/3-D alike: spatial axes
    first, then I/g, O). A depthwise conv (``group == C``, multiplier m) gives ``(kh, kw, 1, C*m)``;
    for Keras's DepthwiseConv2D reshape it to ``(kh, kw, C, m)``.
  * Deconvolution ``(I, O/g, kh, kw)`` -> Conv2DTranspose ``(kh, kw, O/g, I)`` (no spatial flip:
    both frameworks define it as the gradient of a cross-correlation). Caffe's output size never has
    output padding; pick Keras's ``padding``/``output_padding`` to match.
  * InnerProduct ``(N, K)`` -> Dense ``(K, N)``. When the InnerProduct's input is a spatial blob
    ``(N, C, H, W)`` - directly, or through order-preserving layers (Flatten, Reshape, Dropout,
    ReLU...) as CaffeNet's fc6 after pool5 - Caffe flattens it in ``C, H, W`` order, while Keras's
    Flatten of an NHWC tensor gives ``H, W, C`` order. The K rows of that (first) Dense kernel are
    permuted accordingly, ``kernel_cl[(h*W + w)*C + c] = kernel_caffe[:, c*H*W + h*W + w]``, with
    C, H, W read from the net's blob shapes (so pass the deploy input shape the weights were trained
    at). Forgetting this permutation is the classic Caffe-to-Keras porting bug: the net runs and
    gives wrong answers.
  * Scale/Bias operands spanning ``(C, H, W)`` become ``(H, W, C)``; per-channel vectors are
    unchanged, as are Embed, BatchNorm, BN, PReLU and Normalize arrays.
  * Layer types with no known channels-last meaning (LSTM, RNN, Parameter, Python...) are errors.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.io.atomic import atomic_path

PathLike = str | os.PathLike
LAYOUTS = ("caffe", "channels_last")

_KERNEL_TYPES = ("Convolution", "Deconvolution", "ConvolutionDepthwise", "InnerProduct", "Embed")
# Layers whose top holds the bottom's values in the same memory order (a Flatten/Reshape) or
# elementwise functions of them: an InnerProduct fed through them still sees the spatial blob's order.
_ORDER_PRESERVING = ("Flatten", "Reshape", "Dropout", "Split", "ReLU", "ELU", "Sigmoid", "TanH", "AbsVal",
                     "BNLL", "Power", "Exp", "Log", "Threshold", "Swish", "Clip", "GELU")


def _kinds(layer: Any) -> list[str]:
    """The kind of each of ``layer``'s blobs, in blob order."""
    t = layer.param.type
    n = len(layer.blobs)
    if t in _KERNEL_TYPES:
        return ["kernel", "bias"][:n]
    if t == "Scale":
        return ["beta"] if len(layer.param.bottom) > 1 else ["gamma", "beta"][:n]
    if t == "Bias" and n == 1:
        return ["bias"]
    if t == "BatchNorm" and n == 3:
        return ["mean", "var", "scale_factor"]  # the factor is folded into mean/var, never written
    if t == "BN" and n == 4:
        return ["gamma", "beta", "mean", "var"]
    if t == "PReLU" and n == 1:
        return ["alpha"]
    if t == "Normalize" and n == 1:
        return ["scale"]
    return [str(i) for i in range(n)]


def _caffe_arrays(layer: Any) -> OrderedDict[str, np.ndarray]:
    """``{kind: array}`` of one layer in Caffe's layout."""
    blobs = layer.dump_blobs()
    kinds = _kinds(layer)
    t = layer.param.type
    if t == "BatchNorm" and len(blobs) == 3:
        sf = float(np.asarray(blobs[2]).reshape(-1)[0]) if blobs[2].size else 0.0
        factor = 0.0 if sf == 0 else 1.0 / sf
        dtype = blobs[0].dtype
        return OrderedDict([("mean", (blobs[0] * factor).astype(dtype)), ("var", (blobs[1] * factor).astype(dtype))])
    if t == "BN" and len(blobs) == 4:
        return OrderedDict((k, b.reshape(-1)) for k, b in zip(kinds, blobs))
    return OrderedDict(zip(kinds, blobs))


def _producer(net: Any, index: int, blob: str) -> int | None:
    """Index of the last plan before ``index`` that writes ``blob`` (in-place layers included)."""
    for j in range(index - 1, -1, -1):
        if blob in net._plans[j].tops:
            return j
    return None


def _ip_input_shape(net: Any, index: int) -> tuple[int, ...]:
    """The shape of the blob an InnerProduct really flattens: its bottom's, or, through
    order-preserving layers (Flatten, Dropout, ReLU...), the spatial blob they came from."""
    plan = net._plans[index]
    blob = plan.bottoms[0]
    shape = tuple(net._shapes[blob])
    k = net._plans[index].layer.k
    while len(shape) <= 2:
        j = _producer(net, index, blob)
        if j is None:
            break
        prev = net._plans[j]
        if prev.layer.param.type not in _ORDER_PRESERVING or not prev.bottoms:
            break
        up = tuple(net._shapes[prev.bottoms[0]])
        if len(up) < 2 or int(np.prod(up[1:])) != k:
            break
        index, blob, shape = j, prev.bottoms[0], up
    return shape


def _move_channels_last(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, 0, -1))


def _channels_last_arrays(net: Any, index: int) -> OrderedDict[str, np.ndarray]:
    layer = net._plans[index].layer
    t = layer.param.type
    arrays = _caffe_arrays(layer)
    where = f"{net.source}: layer '{layer.name}' ({t})"
    if t in ("Convolution", "ConvolutionDepthwise", "Deconvolution"):
        w = arrays["kernel"]
        nd = w.ndim
        # conv (O, I/g, *k) -> (*k, I/g, O); deconv (I, O/g, *k) -> (*k, O/g, I): the same permutation
        arrays["kernel"] = np.ascontiguousarray(w.transpose(*range(2, nd), 1, 0))
        return arrays
    if t == "InnerProduct":
        w = arrays["kernel"]
        kn = w if layer.transpose else w.T  # (K, N)
        shape = _ip_input_shape(net, index)
        spatial = shape[layer.axis + 1:]
        if len(shape) > layer.axis + 1 and int(np.prod(spatial)) > 1:
            if layer.axis != 1:
                raise CaffeportError(f"{where}: channels_last: flattens axes {layer.axis}.. of a {shape} blob; "
                                     "only axis 1 (N, C, spatial...) has a channels-last order (use --layout caffe)")
            c = shape[1]
            n_out = kn.shape[1]
            # rows in Caffe's (C, *spatial) order -> (*spatial, C) order
            kn = kn.reshape(c, *spatial, n_out)
            kn = np.moveaxis(kn, 0, -2).reshape(-1, n_out)
        arrays["kernel"] = np.ascontiguousarray(kn)
        return arrays
    if t in ("Scale", "Bias"):
        p = layer.param.scale_param if t == "Scale" else layer.param.bias_param
        bshape = tuple(net._shapes[net._plans[index].bottoms[0]])
        axis = int(p.axis) % len(bshape) if bshape else 0
        for k, a in arrays.items():
            if a.ndim <= 1:
                continue
            if axis == 1 and axis + a.ndim == len(bshape):
                arrays[k] = _move_channels_last(a)
            else:
                raise CaffeportError(f"{where}: channels_last: a {a.shape} operand from axis {axis} of a "
                                     f"{bshape} blob has no channels-last layout (use --layout caffe)")
        return arrays
    if t in ("Embed", "BatchNorm", "BN", "PReLU", "Normalize"):
        return arrays
    raise CaffeportError(f"{where}: channels_last: no known channels-last layout for this layer type's "
                         "weights (use --layout caffe)")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise CaffeportError(f"unknown weights layout {layout!r} (one of: {', '.join(LAYOUTS)})")


def weights_arrays(net: Any, layout: str = "caffe") -> OrderedDict[str, np.ndarray]:
    """``{"<layer>/<kind>": array}`` for every layer with parameter blobs, in net order."""
    _check_layout(layout)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for i, plan in enumerate(net._plans):
        layer = plan.layer
        if not len(layer.blobs):
            continue
        arrays = _caffe_arrays(layer) if layout == "caffe" else _channels_last_arrays(net, i)
        for kind, a in arrays.items():
            out[f"{layer.name}/{kind}"] = np.ascontiguousarray(a)
    return out


def caffe_to_channels_last(net: Any) -> dict[str, np.ndarray]:
    """The net's weights in TensorFlow/Keras layouts, ``{"<layer>/<kind>": array}`` (module docstring)."""
    return dict(weights_arrays(net, "channels_last"))


def export_weights(net: Any, path: PathLike, layout: str = "caffe") -> dict[str, np.ndarray]:
    """Write the net's weights as an ``.npz`` of ``"<layer>/<kind>"`` arrays (no pickles), atomically.
    Returns what was written."""
    arrays = weights_arrays(net, layout)
    p = Path(path)
    if p.suffix != ".npz":
        raise CaffeportError(f"{p}: the weights file must end in .npz (np.savez would append it)")
    if not p.parent.exists():
        raise CaffeportError(f"{p}: folder {p.parent} does not exist")
    with atomic_path(p, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return dict(arrays)


def load_weights(path: PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`export_weights` (``allow_pickle=False``)."""
    p = Path(path)
    if not p.exists():
        raise CaffeportError(f"weights file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise CaffeportError(f"{p}: not an .npz of arrays ({e})") from None


def weights_to_blobs(net: Any, arrays: Mapping[str, np.ndarray] | PathLike) -> OrderedDict[str, list[np.ndarray]]:
    """Caffe-layout ``{"<layer>/<kind>": array}`` (or its .npz) -> ``{layer: [blobs]}`` for
    ``net.copy_from``, with the blob order and shapes of ``net``'s layers. Layers of the file that
    the net lacks are ignored; a layer of the net must have all its kinds in the file or none."""
    if not isinstance(arrays, Mapping):
        arrays = load_weights(arrays)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, a in arrays.items():
        layer, sep, kind = key.rpartition("/")
        if not sep or not layer:
            raise CaffeportError(f"weights key {key!r} is not '<layer>/<kind>'")
        grouped.setdefault(layer, {})[kind] = np.asarray(a)
    out: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    for plan in net._plans:
        layer = plan.layer
        got = grouped.get(layer.name)
        if got is None or not len(layer.blobs):
            continue
        kinds = _kinds(layer)
        if layer.param.type == "BatchNorm" and kinds[-1] == "scale_factor":
            kinds = kinds[:2]
            got = dict(got, scale_factor=np.ones((1,), dtype=np.asarray(got.get("mean", 0.0)).dtype))
        missing = [k for k in kinds if k not in got]
        extra = sorted(set(got) - set(_kinds(layer)))
        if missing or extra:
            raise CaffeportError(f"weights: layer '{layer.name}' ({layer.param.type}) needs kinds "
                                 f"{', '.join(kinds)}; missing {missing or 'none'}, unexpected {extra or 'none'}")
        blobs = []
        for kind, p in zip(_kinds(layer), layer.blobs):
            a = got[kind]
            want = tuple(p.shape)
            if a.shape != want and tuple(d for d in a.shape if d != 1) != tuple(d for d in want if d != 1):
                raise CaffeportError(f"weights: layer '{layer.name}' {kind}: {a.shape} does not fit the net's "
                                     f"{want} (a caffe-layout file is expected)")
            blobs.append(a.reshape(want))
        out[layer.name] = blobs
    return out
