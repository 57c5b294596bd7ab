"""Caffe net -> ONNX graph, built node by node from each layer's ``LayerParameter`` and blobs.

Why a direct builder rather than tracing the PyTorch module: every Caffe rule that ONNX runtimes
disagree about is written out explicitly here, so the file means the same thing in every runtime:

- Pooling never uses ``ceil_mode``: the exact Caffe output size (CEIL rounding, pad clipping) is
  reached with floor rounding and asymmetric end pads; AVE pooling divides by the full kernel inside
  the padded tensor and a constant multiplier restores Caffe's divisor where the last window runs past
  ``H + pad`` (Caffe counts the real padding, not the ceil overflow).
- LRN ACROSS_CHANNELS is ONNX ``LRN`` (same alpha/size convention); WITHIN_CHANNEL is decomposed as
  Caffe does (square, average pool with divisor size^2, ``(1 + alpha*avg)^-beta``; ``k`` unused).
- BatchNorm is ``(x - mean) / sqrt(var + eps)`` with Caffe's scale-factor blob folded in.

Per-type knowledge lives in :data:`CONVERTERS`, keyed by the Caffe type string. A converter gets an
:class:`OnnxLayer` (the layer's param, ONNX value names of its bottoms/tops, shapes and numpy blobs)
and appends nodes to the :class:`GraphBuilder`. A type without a converter is reported by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.export.common import layers_without_form
from caffeport.proto import caffe_pb2


class NoOnnxForm(CaffeportError):
    """A layer (or one of its settings) that ONNX cannot express."""


DEFAULT_OPSET = 17
MIN_OPSET = 13
FLT_MAX = float(np.finfo(np.float32).max)


def _onnx():  # imported lazily: onnx is only needed to export
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is a dependency
        raise CaffeportError("ONNX export needs the 'onnx' package: pip install onnx") from e
    return onnx


# --------------------------------------------------------------------------------------------------
# graph building
# --------------------------------------------------------------------------------------------------
class GraphBuilder:
    """Collects ONNX nodes and initializers with unique value names."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()
        self._counter = 0

    def reserve(self, name: str) -> str:
        self._names.add(name)
        return name

    def fresh(self, hint: str) -> str:
        """A value name not used yet, derived from ``hint``."""
        name = hint
        while name in self._names:
            self._counter += 1
            name = f"{hint}_{self._counter}"
        self._names.add(name)
        return name

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        """A constant initializer (float32 unless told) named after ``hint``."""
        onnx = _onnx()
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        name = self.fresh(hint)
        self.initializers.append(onnx.numpy_helper.from_array(arr, name))
        return name

    def ints(self, hint: str, values: Sequence[int]) -> str:
        return self.const(hint, list(values), np.int64)

    def node(self, op: str, inputs: Sequence[str], out: str | None = None, *, name: str | None = None,
             n_out: int = 1, **attrs: Any) -> str:
        """Append one node; returns its (first) output name (fresh unless ``out`` is given)."""
        onnx = _onnx()
        outs = [out if out is not None else self.fresh(f"{name or op}_out")]
        outs += [self.fresh(f"{outs[0]}_{i}") for i in range(1, n_out)]
        self.nodes.append(onnx.helper.make_node(op, list(inputs), outs, name=self.fresh(f"{name or op}"),
                                                **attrs))
        return outs[0]

    def reduce(self, op: str, x: str, axes: Sequence[int], hint: str, keepdims: int = 1) -> str:
        """A Reduce* node with axes as attribute or input, whichever this opset wants."""
        as_input = op == "ReduceSum" or self.opset >= 18
        if as_input:
            return self.node(op, [x, self.ints(f"{hint}_axes", axes)], name=hint, keepdims=keepdims)
        return self.node(op, [x], name=hint, axes=list(axes), keepdims=keepdims)


@dataclass
class OnnxLayer:
    """What a converter sees of one Caffe layer."""

    param: caffe_pb2.LayerParameter
    bottoms: list[str]  # ONNX value names
    tops: list[str]  # ONNX value names the converter must produce, in order
    bottom_shapes: list[tuple[int, ...]]
    top_shapes: list[tuple[int, ...]]
    blobs: list[np.ndarray]
    g: GraphBuilder
    values: dict[str, np.ndarray] = field(default_factory=dict)  # computed tops (shape-only layers)

    @property
    def name(self) -> str:
        return self.param.name

    def error(self, msg: str) -> NoOnnxForm:
        return NoOnnxForm(f"layer '{self.param.name}' ({self.param.type}): {msg}")

    def out(self, op: str, inputs: Sequence[str], i: int = 0, **attrs: Any) -> str:
        """The node producing top ``i``."""
        return self.g.node(op, inputs, self.tops[i], name=self.name, **attrs)

    def tmp(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        """An intermediate node of this layer."""
        return self.g.node(op, inputs, name=self.name, **attrs)

    def const(self, what: str, value: Any, dtype: Any = np.float32) -> str:
        return self.g.const(f"{self.name}_{what}", value, dtype)

    def ints(self, what: str, values: Sequence[int]) -> str:
        return self.g.ints(f"{self.name}_{what}", values)


Converter = Callable[[OnnxLayer], None]
CONVERTERS: dict[str, Converter] = {}


def converter(*types: str) -> Callable[[Converter], Converter]:
    """Register the ONNX converter of one or more Caffe layer types."""

    def deco(fn: Converter) -> Converter:
        for t in types:
            CONVERTERS[t] = fn
        return fn

    return deco


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _chain(L: OnnxLayer, ops: list[tuple[str, list[str], dict[str, Any]]], x: str) -> None:
    """Apply ``ops`` (op, extra inputs, attrs) in sequence to ``x``; the last one writes the top."""
    if not ops:
        L.out("Identity", [x])
        return
    for i, (op, extra, attrs) in enumerate(ops):
        x = (L.out if i == len(ops) - 1 else L.tmp)(op, [x, *extra], **attrs)


# --------------------------------------------------------------------------------------------------
# vision
# --------------------------------------------------------------------------------------------------
def _spatial(values: Sequence[int], h: int | None, w: int | None, has_hw: bool, n: int, default: int) -> list[int]:
    if has_hw:
        return [int(h or 0), int(w or 0)]
    vals = list(values)
    if not vals:
        return [default] * n
    return [int(vals[0])] * n if len(vals) == 1 else [int(v) for v in vals]


def _conv_geometry(L: OnnxLayer, n: int) -> tuple[list[int], list[int], list[int]]:
    cp = L.param.convolution_param
    if cp.axis not in (1, 1 - len(L.bottom_shapes[0])):
        raise L.error(f"convolution over axis {cp.axis} has no ONNX form (only axis 1)")
    stride = _spatial(cp.stride, cp.stride_h, cp.stride_w, cp.HasField("stride_h"), n, 1)
    pad = _spatial(cp.pad, cp.pad_h, cp.pad_w, cp.HasField("pad_h"), n, 0)
    dil = _spatial(cp.dilation, None, None, False, n, 1)
    return stride, pad, dil


@converter("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution")
def _convolution(L: OnnxLayer) -> None:
    w = L.blobs[0]
    n = w.ndim - 2
    stride, pad, dil = _conv_geometry(L, n)
    c_in = L.bottom_shapes[0][1]
    group = c_in // w.shape[1]  # Caffe's group (depthwise forks: one group per channel)
    ins = [L.bottoms[0], L.const("weight", w)]
    if L.param.convolution_param.bias_term and len(L.blobs) > 1:
        ins.append(L.const("bias", L.blobs[1].reshape(-1)))
    L.out("Conv", ins, kernel_shape=list(w.shape[2:]), strides=stride, pads=pad + pad, dilations=dil,
          group=group)


@converter("Deconvolution")
def _deconvolution(L: OnnxLayer) -> None:
    w = L.blobs[0]  # (C_in, num_output / group, k...) as ONNX ConvTranspose wants
    n = w.ndim - 2
    stride, pad, dil = _conv_geometry(L, n)
    group = int(L.param.convolution_param.group)
    ins = [L.bottoms[0], L.const("weight", w)]
    if L.param.convolution_param.bias_term and len(L.blobs) > 1:
        ins.append(L.const("bias", L.blobs[1].reshape(-1)))
    L.out("ConvTranspose", ins, kernel_shape=list(w.shape[2:]), strides=stride, pads=pad + pad,
          dilations=dil, group=group)


def _pool_cfg(pp: caffe_pb2.PoolingParameter, H: int, W: int) -> tuple[list[int], list[int], list[int]]:
    if pp.global_pooling:
        return [H, W], [1, 1], [0, 0]
    kernel = [pp.kernel_size] * 2 if pp.HasField("kernel_size") else [pp.kernel_h, pp.kernel_w]
    stride = [pp.stride_h, pp.stride_w] if pp.HasField("stride_h") else [pp.stride] * 2
    pad = [pp.pad_h, pp.pad_w] if pp.HasField("pad_h") else [pp.pad] * 2
    return [int(k) for k in kernel], [int(s) for s in stride], [int(p) for p in pad]


def caffe_ave_divisor(size: int, out: int, k: int, s: int, p: int) -> np.ndarray:
    """Caffe's AVE pooling divisor along one axis: the window clipped to ``size + pad`` (before
    clipping to the image), so real padding counts and ceil overflow does not."""
    start = np.arange(out) * s - p
    end = np.minimum(start + k, size + p)
    return (end - start).astype(np.int64)


def caffe_pooled_size(size: int, k: int, s: int, p: int, ceil: bool = True) -> int:
    """Caffe's pooled size along one axis (CEIL or FLOOR rounding; with padding the last window
    may not start inside the padded image)."""
    q = size + 2 * p - k
    o = (-(-q // s) if ceil else q // s) + 1
    if p and (o - 1) * s >= size + p:
        o -= 1
    return o


def _emit_pool(L: OnnxLayer, x: str, in_hw: Sequence[int], out_hw: Sequence[int], kernel: list[int],
               stride: list[int], pad: list[int], is_max: bool, last: Callable[..., str],
               want_mask: bool = False) -> str:
    """Nodes computing Caffe's pooling of ``x`` (N, C, H, W); the final node is made by ``last``
    (``L.out`` or ``L.tmp``). With ``want_mask`` (MAX only) returns the ONNX value holding the
    flat in-image indices (h * W + w) of each maximum, as float, like Caffe's mask top."""
    H, W = in_hw
    oh, ow = out_hw
    if not want_mask and (kernel == [H, W] and pad == [0, 0] and (oh, ow) == (1, 1)):
        return last("GlobalMaxPool" if is_max else "GlobalAveragePool", [x])
    # End pads that make floor rounding give Caffe's (ceil, clipped) output size exactly.
    end = [max(0, (o - 1) * s + k - n - p) for o, s, k, n, p in zip((oh, ow), stride, kernel, (H, W), pad)]
    begin = list(pad)
    fits = all(b < k and e < k for b, e, k in zip(begin, end, kernel))
    padded = not fits and any(begin + end)
    if padded:  # pads >= kernel are not allowed on pool nodes: pad explicitly
        value = -FLT_MAX if is_max else 0.0
        x = L.tmp("Pad", [x, L.ints("pads", [0, 0, *begin, 0, 0, *end]), L.const("pad_value", value)])
        Hp, Wp = H + begin[0] + end[0], W + begin[1] + end[1]
        begin, end = [0, 0], [0, 0]
    attrs: dict[str, Any] = dict(kernel_shape=kernel, strides=stride, pads=begin + end)
    if is_max:
        if not want_mask:
            return last("MaxPool", [x], **attrs)
        y = last("MaxPool", [x], **attrs)
        node = L.g.nodes[-1]
        idx = L.g.fresh(f"{L.name}_argmax")
        node.output.append(idx)
        # ONNX indices run over the whole (N, C, H, W) input of the node: keep the in-plane part.
        if not padded:
            Hp, Wp = H, W
        plane = L.tmp("Mod", [idx, L.const("plane", Hp * Wp, np.int64)])
        if padded:  # indices into the padded plane: back to image coordinates
            row = L.tmp("Div", [plane, L.const("wp", Wp, np.int64)])
            col = L.tmp("Mod", [plane, L.const("wp2", Wp, np.int64)])
            row = L.tmp("Sub", [row, L.const("pt", pad[0], np.int64)])
            col = L.tmp("Sub", [col, L.const("pl", pad[1], np.int64)])
            plane = L.tmp("Add", [L.tmp("Mul", [row, L.const("w", W, np.int64)]), col])
        return plane
    dh = caffe_ave_divisor(H, oh, kernel[0], stride[0], pad[0])
    dw = caffe_ave_divisor(W, ow, kernel[1], stride[1], pad[1])
    div = dh[:, None] * dw[None, :]
    full = kernel[0] * kernel[1]
    if np.all(div == full):
        return last("AveragePool", [x], count_include_pad=1, **attrs)
    # Every window lies inside the padded tensor, so the node divides by the full kernel; rescale to
    # Caffe's divisor (windows with no element at all, possible only without padding, give 0).
    mult = np.where(div > 0, full / np.maximum(div, 1), 0.0).astype(np.float32)
    y = L.tmp("AveragePool", [x], count_include_pad=1, **attrs)
    return last("Mul", [y, L.const("divisor_fix", mult.reshape(1, 1, oh, ow))])


@converter("Pooling")
def _pooling(L: OnnxLayer) -> None:
    pp = L.param.pooling_param
    if pp.pool == caffe_pb2.PoolingParameter.STOCHASTIC:
        raise L.error("STOCHASTIC pooling has no ONNX form (random in TRAIN; TEST weighs by activation)")
    N, C, H, W = L.bottom_shapes[0]
    oh, ow = L.top_shapes[0][2], L.top_shapes[0][3]
    kernel, stride, pad = _pool_cfg(pp, H, W)
    is_max = pp.pool == caffe_pb2.PoolingParameter.MAX
    if len(L.tops) > 1:
        if not is_max:
            raise L.error("a second top exists only for MAX pooling")
        idx = _emit_pool(L, L.bottoms[0], (H, W), (oh, ow), kernel, stride, pad, True, L.out, want_mask=True)
        L.out("Cast", [idx], 1, to=_onnx().TensorProto.FLOAT)
        return
    _emit_pool(L, L.bottoms[0], (H, W), (oh, ow), kernel, stride, pad, is_max, L.out)


@converter("SPP")
def _spp(L: OnnxLayer) -> None:
    sp = L.param.spp_param
    if sp.pool == caffe_pb2.SPPParameter.STOCHASTIC:
        raise L.error("STOCHASTIC pooling has no ONNX form")
    is_max = sp.pool == caffe_pb2.SPPParameter.MAX
    N, C, H, W = L.bottom_shapes[0]
    height = int(sp.pyramid_height)
    levels = []
    for lvl in range(height):
        bins = 2**lvl
        kh, kw = -(-H // bins), -(-W // bins)
        ph, pw = (kh * bins - H + 1) // 2, (kw * bins - W + 1) // 2
        oh, ow = caffe_pooled_size(H, kh, kh, ph), caffe_pooled_size(W, kw, kw, pw)
        last = L.out if height == 1 else L.tmp
        y = _emit_pool(L, L.bottoms[0], (H, W), (oh, ow), [kh, kw], [kh, kw], [ph, pw], is_max, last)
        if height == 1:
            return
        levels.append(L.tmp("Flatten", [y], axis=1))
    L.out("Concat", levels, axis=1)


@converter("LRN")
def _lrn(L: OnnxLayer) -> None:
    lp = L.param.lrn_param
    size = int(lp.local_size)
    if lp.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        L.out("LRN", [L.bottoms[0]], size=size, alpha=float(lp.alpha), beta=float(lp.beta), bias=float(lp.k))
        return
    # WITHIN_CHANNEL, as Caffe composes it: x * (1 + alpha * avgpool(x^2, size, pad (size-1)/2))^-beta
    x = L.bottoms[0]
    p = (size - 1) // 2
    sq = L.tmp("Mul", [x, x])
    avg = L.tmp("AveragePool", [sq], kernel_shape=[size, size], strides=[1, 1], pads=[p, p, p, p],
                count_include_pad=1)
    scaled = L.tmp("Mul", [avg, L.const("alpha", lp.alpha)])
    base = L.tmp("Add", [scaled, L.const("one", 1.0)])
    powed = L.tmp("Pow", [base, L.const("neg_beta", -lp.beta)])
    L.out("Mul", [x, powed])


@converter("Crop")
def _crop(L: OnnxLayer) -> None:
    cp = L.param.crop_param
    shape, ref = L.bottom_shapes
    axis = _axis(cp.axis, len(shape))
    starts, ends, axes = [], [], []
    for i in range(axis, len(shape)):
        off = 0
        if len(cp.offset) == 1:
            off = int(cp.offset[0])
        elif len(cp.offset) > 1:
            off = int(cp.offset[i - axis])
        starts.append(off)
        ends.append(off + ref[i])
        axes.append(i)
    L.out("Slice", [L.bottoms[0], L.ints("starts", starts), L.ints("ends", ends), L.ints("axes", axes)])


# --------------------------------------------------------------------------------------------------
# common
# --------------------------------------------------------------------------------------------------
@converter("InnerProduct")
def _inner_product(L: OnnxLayer) -> None:
    ip = L.param.inner_product_param
    shape = L.bottom_shapes[0]
    axis = _axis(ip.axis, len(shape))
    w = L.blobs[0].reshape(L.blobs[0].shape[-2:]) if L.blobs[0].ndim > 2 else L.blobs[0]
    bias = L.blobs[1].reshape(-1) if ip.bias_term and len(L.blobs) > 1 else None
    x = L.bottoms[0]
    if axis == 1:
        if len(shape) != 2:
            x = L.tmp("Flatten", [x], axis=1)
        ins = [x, L.const("weight", w)]
        if bias is not None:
            ins.append(L.const("bias", bias))
        L.out("Gemm", ins, transB=0 if ip.transpose else 1)
        return
    x = L.tmp("Reshape", [x, L.ints("shape", [0] * axis + [-1])])
    wk = w if ip.transpose else w.T  # (K, N)
    if bias is None:
        L.out("MatMul", [x, L.const("weight", np.ascontiguousarray(wk))])
        return
    y = L.tmp("MatMul", [x, L.const("weight", np.ascontiguousarray(wk))])
    L.out("Add", [y, L.const("bias", bias)])


@converter("Softmax")
def _softmax(L: OnnxLayer) -> None:
    L.out("Softmax", [L.bottoms[0]], axis=_axis(L.param.softmax_param.axis, len(L.bottom_shapes[0])))


@converter("Concat")
def _concat(L: OnnxLayer) -> None:
    cp = L.param.concat_param
    axis = cp.axis if cp.HasField("axis") or not cp.HasField("concat_dim") else cp.concat_dim
    L.out("Concat", L.bottoms, axis=_axis(axis, len(L.bottom_shapes[0])))


@converter("Slice")
def _slice(L: OnnxLayer) -> None:
    sp = L.param.slice_param
    shape = L.bottom_shapes[0]
    axis = _axis(sp.axis if sp.HasField("axis") or not sp.HasField("slice_dim") else sp.slice_dim, len(shape))
    points = [0, *[int(p) for p in sp.slice_point], shape[axis]]
    if not sp.slice_point:
        step = shape[axis] // len(L.tops)
        points = [i * step for i in range(len(L.tops) + 1)]
    for i in range(len(L.tops)):
        L.out("Slice", [L.bottoms[0], L.ints(f"starts{i}", [points[i]]), L.ints(f"ends{i}", [points[i + 1]]),
                        L.ints(f"axes{i}", [axis])], i)


@converter("Eltwise")
def _eltwise(L: OnnxLayer) -> None:
    ep = L.param.eltwise_param
    op = ep.operation
    if op == caffe_pb2.EltwiseParameter.PROD:
        acc = L.bottoms[0]
        for i, b in enumerate(L.bottoms[1:], 1):
            acc = (L.out if i == len(L.bottoms) - 1 else L.tmp)("Mul", [acc, b])
        return
    if op == caffe_pb2.EltwiseParameter.MAX:
        L.out("Max", L.bottoms)
        return
    coeffs = list(ep.coeff) or [1.0] * len(L.bottoms)
    if len(coeffs) != len(L.bottoms):
        raise L.error(f"{len(coeffs)} coeffs for {len(L.bottoms)} bottoms")
    terms = [b if c == 1.0 else L.tmp("Mul", [b, L.const(f"coeff{i}", c)]) for i, (b, c) in
             enumerate(zip(L.bottoms, coeffs))]
    acc = terms[0]
    if len(terms) == 1:
        L.out("Identity", [acc])
    for i, t in enumerate(terms[1:], 1):
        acc = (L.out if i == len(terms) - 1 else L.tmp)("Add", [acc, t])


@converter("Upsample")
def _upsample(L: OnnxLayer) -> None:
    """SegNet unpooling: scatter each value to its MAX-pool mask position (ScatterElements over the
    flattened plane; repeated positions: the last write wins, as in the fork's loop)."""
    ho, wo = (int(d) for d in L.top_shapes[0][2:])
    flat = L.ints("flat", [0, 0, -1])
    data = L.tmp("Reshape", [L.bottoms[0], flat])
    idx = L.tmp("Reshape", [L.tmp("Cast", [L.bottoms[1]], to=7), flat])  # 7 = INT64, truncates like C
    nc = L.tmp("Slice", [L.tmp("Shape", [L.bottoms[0]]), L.ints("s0", [0]), L.ints("s2", [2])])
    zshape = L.tmp("Concat", [nc, L.ints("plane", [ho * wo])], axis=0)
    zeros = L.tmp("ConstantOfShape", [zshape])
    scattered = L.tmp("ScatterElements", [zeros, idx, data], axis=2)
    L.out("Reshape", [scattered, L.ints("shape", [0, 0, ho, wo])])


@converter("Flatten")
def _flatten(L: OnnxLayer) -> None:
    fp = L.param.flatten_param
    shape = L.bottom_shapes[0]
    a = _axis(fp.axis, len(shape))
    e = _axis(fp.end_axis, len(shape))
    spec = [0] * a + [-1] + [int(d) for d in shape[e + 1:]]
    L.out("Reshape", [L.bottoms[0], L.ints("shape", spec)])


@converter("Reshape")
def _reshape(L: OnnxLayer) -> None:
    rp = L.param.reshape_param
    shape = L.bottom_shapes[0]
    out = L.top_shapes[0]
    start = _axis(rp.axis, len(shape) + 1) if rp.axis < 0 else rp.axis
    n_in = len(shape) - start if rp.num_axes == -1 else rp.num_axes
    dims = [int(d) for d in rp.shape.dim]
    spec = [0] * start + dims + [int(d) for d in out[start + len(dims):]]
    # Inside the spec, 0 copies the input dim at the same index in both Caffe and ONNX; past the
    # replaced range the indices shift, so those dims are written out.
    del n_in
    L.out("Reshape", [L.bottoms[0], L.ints("shape", spec)])


@converter("Split")
def _split(L: OnnxLayer) -> None:
    for i in range(len(L.tops)):
        L.out("Identity", [L.bottoms[0]], i)


@converter("Silence")
def _silence(L: OnnxLayer) -> None:
    return None


@converter("Dropout")
def _dropout(L: OnnxLayer) -> None:
    dp = L.param.dropout_param
    if dp.scale_train:
        L.out("Identity", [L.bottoms[0]])
    else:  # Fast R-CNN fork: no scaling in training, so test time multiplies by (1 - p)
        L.out("Mul", [L.bottoms[0], L.const("keep", 1.0 - dp.dropout_ratio)])


@converter("Permute")
def _permute(L: OnnxLayer) -> None:
    n = len(L.bottom_shapes[0])
    order = [int(o) for o in L.param.permute_param.order]
    order += [i for i in range(n) if i not in order]
    L.out("Transpose", [L.bottoms[0]], perm=order)


@converter("ShuffleChannel")
def _shuffle_channel(L: OnnxLayer) -> None:
    g = int(L.param.shuffle_channel_param.group)
    N, C, *rest = L.bottom_shapes[0]
    x = L.tmp("Reshape", [L.bottoms[0], L.ints("split", [0, g, C // g, *rest])])
    x = L.tmp("Transpose", [x], perm=[0, 2, 1, *range(3, 3 + len(rest))])
    L.out("Reshape", [x, L.ints("merge", [0, C, *rest])])


@converter("ArgMax")
def _argmax(L: OnnxLayer) -> None:
    """Caffe sorts (value, index) pairs descending, so equal values give the LARGER index first:
    ArgMax with select_last_index for top 1, else TopK (which prefers the lower index) on the
    reversed axis."""
    ap = L.param.argmax_param
    x = L.bottoms[0]
    shape = L.bottom_shapes[0]
    k = int(ap.top_k)
    if ap.HasField("axis"):
        ax = _axis(ap.axis, len(shape))
        n = shape[ax]
    else:  # over everything after the batch axis
        x = L.tmp("Flatten", [x], axis=1)
        ax, n = 1, int(np.prod(shape[1:]))
    fl = _onnx().TensorProto.FLOAT
    if k == 1 and not ap.out_max_val:
        idx = L.tmp("ArgMax", [x], axis=ax, keepdims=1, select_last_index=1)
        vals = None
    else:
        rev = L.tmp("Slice", [x, L.ints("rev_starts", [-1]), L.ints("rev_ends", [-(2**63)]),
                              L.ints("rev_axes", [ax]), L.ints("rev_steps", [-1])])
        vals = L.tmp("TopK", [rev, L.ints("k", [k])], axis=ax, largest=1, sorted=1, n_out=2)
        ridx = L.g.nodes[-1].output[1]
        idx = L.tmp("Sub", [L.const("last", n - 1, np.int64), ridx])
    if ap.HasField("axis"):
        if ap.out_max_val:
            L.out("Identity", [vals])
        else:
            L.out("Cast", [idx], to=fl)
        return
    top = [int(d) for d in L.top_shapes[0]]
    fidx = L.tmp("Unsqueeze", [L.tmp("Cast", [idx], to=fl), L.ints("ax1", [1])])  # (N, 1, k)
    if ap.out_max_val:
        fidx = L.tmp("Concat", [fidx, L.tmp("Unsqueeze", [vals, L.ints("ax1v", [1])])], axis=1)
    L.out("Reshape", [fidx, L.ints("top_shape", [0, *top[1:]])])


@converter("Tile")
def _tile(L: OnnxLayer) -> None:
    tp = L.param.tile_param
    shape = L.bottom_shapes[0]
    reps = [1] * len(shape)
    reps[_axis(tp.axis, len(shape))] = int(tp.tiles)
    L.out("Tile", [L.bottoms[0], L.ints("repeats", reps)])


@converter("Reduction")
def _reduction(L: OnnxLayer) -> None:
    """All axes from ``axis`` on are reduced (top shape ``bottom.shape[:axis]``), times coeff;
    MEAN is SUM times coeff / count, as Caffe scales it."""
    rp = L.param.reduction_param
    R = caffe_pb2.ReductionParameter
    shape = L.bottom_shapes[0]
    axis = _axis(rp.axis, len(shape)) if shape else 0
    x = L.tmp("Reshape", [L.bottoms[0], L.ints("rows", [0] * axis + [-1])])
    op = {R.SUM: "ReduceSum", R.MEAN: "ReduceSum", R.ASUM: "ReduceL1", R.SUMSQ: "ReduceSumSquare"}.get(rp.operation)
    if op is None:
        raise L.error(f"unknown reduction operation {rp.operation}")
    coeff = float(rp.coeff)
    if rp.operation == R.MEAN:
        coeff = coeff / max(int(np.prod(shape[axis:])), 1)
    if coeff == 1.0:
        y = L.g.reduce(op, x, [axis], L.name, keepdims=0)
        L.out("Identity", [y])
        return
    y = L.g.reduce(op, x, [axis], L.name, keepdims=0)
    L.out("Mul", [y, L.const("coeff", coeff)])


@converter("Embed")
def _embed(L: OnnxLayer) -> None:
    """Caffe truncates the float index (static_cast<int>), as ONNX Cast does."""
    idx = L.tmp("Cast", [L.bottoms[0]], to=_onnx().TensorProto.INT64)
    if L.param.embed_param.bias_term and len(L.blobs) > 1:
        y = L.tmp("Gather", [L.const("weight", L.blobs[0]), idx], axis=0)
        L.out("Add", [y, L.const("bias", L.blobs[1].reshape(-1))])
    else:
        L.out("Gather", [L.const("weight", L.blobs[0]), idx], axis=0)


@converter("BatchReindex")
def _batch_reindex(L: OnnxLayer) -> None:
    idx = L.tmp("Cast", [L.bottoms[1]], to=_onnx().TensorProto.INT64)
    L.out("Gather", [L.bottoms[0], idx], axis=0)


@converter("Parameter")
def _parameter(L: OnnxLayer) -> None:
    L.out("Identity", [L.const("value", L.blobs[0])])


@converter("MVN")
def _mvn(L: OnnxLayer) -> None:
    """Per row (item, or item and channel): x - mean, and with normalize_variance divided by
    sqrt(mean((x - mean)^2)) + eps (eps on the standard deviation, as Caffe)."""
    mp = L.param.mvn_param
    shape = L.bottom_shapes[0]
    lead = 1 if (mp.across_channels or len(shape) < 2) else 2
    xr = L.tmp("Reshape", [L.bottoms[0], L.ints("rows", [0] * lead + [-1])])
    mean = L.g.reduce("ReduceMean", xr, [lead], f"{L.name}_mean")
    c = L.tmp("Sub", [xr, mean])
    if mp.normalize_variance:
        var = L.g.reduce("ReduceMean", L.tmp("Mul", [c, c]), [lead], f"{L.name}_var")
        denom = L.tmp("Add", [L.tmp("Sqrt", [var]), L.const("eps", mp.eps)])
        c = L.tmp("Div", [c, denom])
    L.out("Reshape", [c, L.ints("shape", [0, *[int(d) for d in shape[1:]]])])


@converter("Im2col")
def _im2col(L: OnnxLayer) -> None:
    """A grouped convolution with one-hot kernels: output channel c*K + (k1, k2, ...) copies input
    channel c at that kernel offset (Caffe's channel-major im2col rows); exact (x*1 + 0s)."""
    cp = L.param.convolution_param
    shape = L.bottom_shapes[0]
    if _axis(cp.axis, len(shape)) != 1:
        raise L.error(f"im2col over axis {cp.axis} has no ONNX form (only axis 1)")
    n = len(shape) - 2
    kernel = _spatial(cp.kernel_size, cp.kernel_h, cp.kernel_w, cp.HasField("kernel_h"), n, 0)
    stride, pad, dil = _conv_geometry(L, n)
    C = shape[1]
    K = int(np.prod(kernel))
    eye = np.eye(K, dtype=np.float32).reshape(K, 1, *kernel)
    w = np.tile(eye, (C,) + (1,) * (n + 1))
    L.out("Conv", [L.bottoms[0], L.const("onehot", w)], kernel_shape=kernel, strides=stride, pads=pad + pad,
          dilations=dil, group=C)


def _interp_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """caffe_cpu_interp2 along one axis, in float32: ratio (in-1)/(out-1) (0 for out 1), source
    index int(ratio*i) with its fraction as weight, the next index clamped at the edge."""
    f32 = np.float32
    r = f32(f32(size_in - 1) / f32(size_out - 1)) if size_out > 1 else f32(0)
    pos = (r * np.arange(size_out, dtype=f32)).astype(f32)
    i0 = pos.astype(np.int64)
    i1 = i0 + (i0 < size_in - 1)
    lam1 = (pos - i0.astype(f32)).astype(f32)
    return i0, i1, (f32(1) - lam1).astype(f32), lam1


@converter("Interp")
def _interp(L: OnnxLayer) -> None:
    """Bilinear resize as the fork computes it (aligned corners, float32 ratio): row/column Gathers
    and the same weighted sums, after the pad_beg/pad_end crop."""
    ip = L.param.interp_param
    N, C, H, W = L.bottom_shapes[0]
    oh, ow = L.top_shapes[0][2], L.top_shapes[0][3]
    pb, pe = int(ip.pad_beg), int(ip.pad_end)
    he, we = H + pb + pe, W + pb + pe
    x = L.bottoms[0]
    if pb or pe:
        x = L.tmp("Slice", [x, L.ints("starts", [-pb, -pb]), L.ints("ends", [-pb + he, -pb + we]),
                            L.ints("axes", [2, 3])])
    if (he, we) == (oh, ow):
        L.out("Identity", [x])
        return
    h0, h1, hl0, hl1 = _interp_axis(he, oh)
    w0, w1, wl0, wl1 = _interp_axis(we, ow)
    r0 = L.tmp("Gather", [x, L.const("h0", h0, np.int64)], axis=2)
    r1 = L.tmp("Gather", [x, L.const("h1", h1, np.int64)], axis=2)
    ci0, ci1 = L.const("w0", w0, np.int64), L.const("w1", w1, np.int64)
    cw0, cw1 = L.const("wl0", wl0.reshape(1, 1, 1, -1)), L.const("wl1", wl1.reshape(1, 1, 1, -1))

    def row(r: str) -> str:
        a = L.tmp("Mul", [cw0, L.tmp("Gather", [r, ci0], axis=3)])
        b = L.tmp("Mul", [cw1, L.tmp("Gather", [r, ci1], axis=3)])
        return L.tmp("Add", [a, b])

    top = L.tmp("Mul", [L.const("hl0", hl0.reshape(1, 1, -1, 1)), row(r0)])
    bot = L.tmp("Mul", [L.const("hl1", hl1.reshape(1, 1, -1, 1)), row(r1)])
    L.out("Add", [top, bot])


# --------------------------------------------------------------------------------------------------
# neuron
# --------------------------------------------------------------------------------------------------
@converter("ReLU")
def _relu(L: OnnxLayer) -> None:
    slope = float(L.param.relu_param.negative_slope)
    if slope:
        L.out("LeakyRelu", [L.bottoms[0]], alpha=slope)
    else:
        L.out("Relu", [L.bottoms[0]])


@converter("PReLU")
def _prelu(L: OnnxLayer) -> None:
    s = L.blobs[0].reshape(-1)
    n = len(L.bottom_shapes[0])
    slope = s.reshape((1,) * max(n - 1, 0)) if s.size == 1 else s.reshape((-1,) + (1,) * (n - 2))
    L.out("PRelu", [L.bottoms[0], L.const("slope", slope)])


@converter("Sigmoid")
def _sigmoid(L: OnnxLayer) -> None:
    L.out("Sigmoid", [L.bottoms[0]])


@converter("TanH")
def _tanh(L: OnnxLayer) -> None:
    L.out("Tanh", [L.bottoms[0]])


@converter("AbsVal")
def _absval(L: OnnxLayer) -> None:
    L.out("Abs", [L.bottoms[0]])


@converter("BNLL")
def _bnll(L: OnnxLayer) -> None:
    L.out("Softplus", [L.bottoms[0]])


@converter("ELU")
def _elu(L: OnnxLayer) -> None:
    L.out("Elu", [L.bottoms[0]], alpha=float(L.param.elu_param.alpha))


@converter("Swish")
def _swish(L: OnnxLayer) -> None:
    beta = float(L.param.swish_param.beta)
    x = L.bottoms[0]
    bx = x if beta == 1.0 else L.tmp("Mul", [x, L.const("beta", beta)])
    L.out("Mul", [x, L.tmp("Sigmoid", [bx])])


@converter("Threshold")
def _threshold(L: OnnxLayer) -> None:
    gt = L.tmp("Greater", [L.bottoms[0], L.const("threshold", L.param.threshold_param.threshold)])
    L.out("Cast", [gt], to=_onnx().TensorProto.FLOAT)


@converter("Clip")
def _clip(L: OnnxLayer) -> None:
    cp = L.param.clip_param
    L.out("Clip", [L.bottoms[0], L.const("min", cp.min), L.const("max", cp.max)])


@converter("Power")
def _power(L: OnnxLayer) -> None:
    pp = L.param.power_param
    if pp.power == 0:  # Caffe: y = 1 whatever x is
        L.out("Add", [L.tmp("Mul", [L.bottoms[0], L.const("zero", 0.0)]), L.const("one", 1.0)])
        return
    ops: list[tuple[str, list[str], dict[str, Any]]] = []
    if pp.scale != 1:
        ops.append(("Mul", [L.const("scale", pp.scale)], {}))
    if pp.shift != 0:
        ops.append(("Add", [L.const("shift", pp.shift)], {}))
    if pp.power != 1:
        ops.append(("Pow", [L.const("power", pp.power)], {}))
    _chain(L, ops, L.bottoms[0])


@converter("Exp")
def _exp(L: OnnxLayer) -> None:
    ep = L.param.exp_param
    log_base = 1.0 if ep.base == -1 else math.log(ep.base)
    inner = log_base * ep.scale
    outer = 1.0 if ep.shift == 0 else (math.e if ep.base == -1 else ep.base) ** ep.shift
    ops: list[tuple[str, list[str], dict[str, Any]]] = []
    if inner != 1:
        ops.append(("Mul", [L.const("inner", inner)], {}))
    ops.append(("Exp", [], {}))
    if outer != 1:
        ops.append(("Mul", [L.const("outer", outer)], {}))
    _chain(L, ops, L.bottoms[0])


@converter("Log")
def _log(L: OnnxLayer) -> None:
    lp = L.param.log_param
    ops: list[tuple[str, list[str], dict[str, Any]]] = []
    if lp.scale != 1:
        ops.append(("Mul", [L.const("scale", lp.scale)], {}))
    if lp.shift != 0:
        ops.append(("Add", [L.const("shift", lp.shift)], {}))
    ops.append(("Log", [], {}))
    if lp.base != -1:
        ops.append(("Mul", [L.const("base_scale", 1.0 / math.log(lp.base))], {}))
    _chain(L, ops, L.bottoms[0])


def _channel_shape(ndim: int, axis: int, shape: Sequence[int]) -> tuple[int, ...]:
    """A parameter of ``shape`` applied from ``axis`` on, padded with trailing 1s for broadcasting."""
    return tuple(int(d) for d in shape) + (1,) * (ndim - axis - len(shape))


def _affine_operand(L: OnnxLayer, blob_or_bottom: np.ndarray | str, shape: Sequence[int], axis: int,
                    what: str) -> str:
    ndim = len(L.bottom_shapes[0])
    if isinstance(blob_or_bottom, np.ndarray):
        return L.const(what, blob_or_bottom.reshape(_channel_shape(ndim, axis, shape)))
    trailing = ndim - axis - len(shape)
    if trailing <= 0:
        return blob_or_bottom
    return L.tmp("Unsqueeze", [blob_or_bottom, L.ints(f"{what}_axes", list(range(len(shape), len(shape) + trailing)))])


@converter("Scale")
def _scale(L: OnnxLayer) -> None:
    sp = L.param.scale_param
    ndim = len(L.bottom_shapes[0])
    axis = _axis(sp.axis, ndim)
    if len(L.bottoms) > 1:
        s_shape, s_src, blobs = L.bottom_shapes[1], L.bottoms[1], L.blobs
    else:
        s_shape, s_src, blobs = L.blobs[0].shape, L.blobs[0], L.blobs[1:]
    if len(s_shape) == 0:
        axis = ndim
    s = _affine_operand(L, s_src, s_shape, axis, "scale")
    if sp.bias_term and blobs:
        y = L.tmp("Mul", [L.bottoms[0], s])
        L.out("Add", [y, L.const("bias", blobs[0].reshape(_channel_shape(ndim, axis, s_shape)))])
    else:
        L.out("Mul", [L.bottoms[0], s])


@converter("Bias")
def _bias(L: OnnxLayer) -> None:
    ndim = len(L.bottom_shapes[0])
    axis = _axis(L.param.bias_param.axis, ndim)
    if len(L.bottoms) > 1:
        b_shape, src = L.bottom_shapes[1], L.bottoms[1]
    else:
        b_shape, src = L.blobs[0].shape, L.blobs[0]
    if len(b_shape) == 0:
        axis = ndim
    L.out("Add", [L.bottoms[0], _affine_operand(L, src, b_shape, axis, "bias")])


@converter("BatchNorm")
def _batch_norm(L: OnnxLayer) -> None:
    bp = L.param.batch_norm_param
    shape = L.bottom_shapes[0]
    ndim = len(shape)
    C = shape[1] if ndim > 1 else 1
    bshape = (1, C) + (1,) * (ndim - 2) if ndim > 1 else (C,)
    x = L.bottoms[0]
    eps = np.float32(bp.eps)
    if bp.HasField("use_global_stats") and not bp.use_global_stats:
        axes = [0, *range(2, ndim)]
        mean = L.g.reduce("ReduceMean", x, axes, f"{L.name}_mean")
        centred = L.tmp("Sub", [x, mean])
        var = L.g.reduce("ReduceMean", L.tmp("Mul", [centred, centred]), axes, f"{L.name}_var")
        std = L.tmp("Sqrt", [L.tmp("Add", [var, L.const("eps", eps)])])
        L.out("Div", [centred, std])
        return
    factor = float(L.blobs[2].reshape(-1)[0])
    f = np.float32(0.0 if factor == 0 else 1.0 / factor)
    mean = (L.blobs[0].reshape(-1).astype(np.float32) * f).astype(np.float32)
    var = (L.blobs[1].reshape(-1).astype(np.float32) * f).astype(np.float32)
    std = np.sqrt(var + eps).astype(np.float32)
    centred = L.tmp("Sub", [x, L.const("mean", mean.reshape(bshape))])
    L.out("Div", [centred, L.const("std", std.reshape(bshape))])


@converter("LSTMUnit")
def _lstm_unit(L: OnnxLayer) -> None:
    """One LSTM step, element-wise as Caffe: gates i, f, o, g from x's four slices; the forget gate
    is cont * sigmoid(x_f), and exactly 0 where cont is 0."""
    c_prev, x, cont = L.bottoms
    D = L.bottom_shapes[0][-1]
    split = L.ints("split", [D] * 4)
    xi = L.tmp("Split", [x, split], axis=-1, n_out=4)
    xf, xo, xg = L.g.nodes[-1].output[1:4]
    i = L.tmp("Sigmoid", [xi])
    o = L.tmp("Sigmoid", [xo])
    g = L.tmp("Tanh", [xg])
    cc = L.tmp("Unsqueeze", [cont, L.ints("axes", [len(L.bottom_shapes[1]) - 1])])
    f = L.tmp("Where", [L.tmp("Equal", [cc, L.const("zero", 0.0)]), L.const("zero_f", 0.0),
                        L.tmp("Mul", [cc, L.tmp("Sigmoid", [xf])])])
    c = L.out("Add", [L.tmp("Mul", [f, c_prev]), L.tmp("Mul", [i, g])], 0)
    L.out("Mul", [o, L.tmp("Tanh", [c])], 1)


@converter("BN")
def _bn(L: OnnxLayer) -> None:
    """PSPNet's BN at inference: slope * (x - mean) * (var + eps)^-0.5 + bias with the stored
    statistics (the fork uses them in TEST, and whenever frozen)."""
    shape = L.bottom_shapes[0]
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    slope, bias, mean, var = (b.reshape(-1).astype(np.float32) for b in L.blobs[:4])
    inv_std = np.power(var + np.float32(L.param.bn_param.eps), np.float32(-0.5)).astype(np.float32)
    y = L.tmp("Sub", [L.bottoms[0], L.const("mean", mean.reshape(bshape))])
    y = L.tmp("Mul", [y, L.const("inv_std", inv_std.reshape(bshape))])
    y = L.tmp("Mul", [y, L.const("slope", slope.reshape(bshape))])
    L.out("Add", [y, L.const("bias", bias.reshape(bshape))])


@converter("Normalize")
def _normalize(L: OnnxLayer) -> None:
    npm = L.param.norm_param
    shape = L.bottom_shapes[0]
    ndim = len(shape)
    x = L.bottoms[0]
    sq = L.tmp("Mul", [x, x])
    axes = list(range(1, ndim)) if npm.across_spatial else [1]
    total = L.g.reduce("ReduceSum", sq, axes, f"{L.name}_sum")
    norm = L.tmp("Sqrt", [L.tmp("Add", [total, L.const("eps", npm.eps)])])
    y = L.tmp("Div", [x, norm])
    s = L.blobs[0].reshape(-1)
    s = s.reshape(()) if s.size == 1 else s.reshape((-1,) + (1,) * (ndim - 2))
    L.out("Mul", [y, L.const("scale", s)])


@converter("PriorBox")
def _shape_only(L: OnnxLayer) -> None:
    """Layers whose top depends only on the bottoms' shapes: the computed top as a constant."""
    for i, t in enumerate(L.tops):
        if t not in L.values:
            raise L.error("no computed value to embed")
        L.out("Identity", [L.const(f"value{i}", L.values[t])], i)


SHAPE_ONLY = {"PriorBox"}


# --------------------------------------------------------------------------------------------------
# the whole net
# --------------------------------------------------------------------------------------------------
@dataclass
class OnnxExport:
    """An exported model and what was checked."""

    model: Any  # onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    max_rel_error: float | None = None
    checks: list[str] = field(default_factory=list)


NO_FORM_REASONS = {
    "DetectionOutput": "SSD's decoding + per-class NMS (ApplyNMSFast: top_k before NMS, adaptive eta, "
                       "keep_top_k over all classes, a variable-length (1, 1, K, 7) top) has no ONNX form; "
                       "ONNX NonMaxSuppression orders, limits and lays out its results differently",
    "ROIPooling": "onnxruntime's MaxRoiPool starts every bin's max at FLT_MIN (the smallest positive float), "
                  "not -FLT_MAX, so bins whose values are all <= 0 differ from Caffe",
    "LSTM": "Caffe's recurrent layers reset the state per step from the cont input; ONNX LSTM/RNN cannot",
    "RNN": "Caffe's recurrent layers reset the state per step from the cont input; ONNX LSTM/RNN cannot",
    "Python": "a Python layer runs arbitrary code",
    "Filter": "the top's batch size depends on the selector's values",
    "Accuracy": "an evaluation layer, not part of a deploy net",
}


def unsupported_layers(net: Any) -> list[str]:
    """'name (Type)' for every layer of ``net`` with has no ONNX form."""
    return layers_without_form(net, CONVERTERS)


def unsupported_types(net: Any) -> set[str]:
    """The Caffe types of the layers :func:`unsupported_layers` names."""
    return {b.rsplit("(", 1)[1].rstrip(")") for b in unsupported_layers(net)}


def net_to_onnx(net: Any, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                graph_name: str | None = None) -> OnnxExport:
    """Build the ONNX model of a caffeport ``Net`` (deploy form: Input layers, no losses).

    ONNX input and output names are the Caffe blob names; an in-place blob's earlier versions get
    suffixed names so that the final value keeps the Caffe name.
    """
    onnx = _onnx()
    if opset < MIN_OPSET:
        raise CaffeportError(f"ONNX opset {opset} is too old: caffeport exports opset {MIN_OPSET} or newer")
    bad = unsupported_layers(net)
    if bad:
        raise NoOnnxForm(
            f"{net.source}: these layers have no ONNX form: {', '.join(bad)}"
            + "".join(f"; {t}: {NO_FORM_REASONS[t]}" for t in sorted(unsupported_types(net)) if t in NO_FORM_REASONS)
            + (" (derive a deploy net first: caffeport deploy)" if any(
                lay.is_data or lay.is_loss for lay in net.layers) else "")
        )
    plans = net._plans
    shapes: dict[str, tuple[int, ...]] = dict(net._shapes)
    empty = [f"'{n}' {s}" for n, s in shapes.items() if any(d <= 0 for d in s)]
    if empty:
        raise CaffeportError(f"{net.source}: blobs with an empty axis cannot be exported: {', '.join(empty[:5])} "
                             "(is the input too small?)")
    g = GraphBuilder(opset)
    inputs = list(net.inputs)
    for name in inputs:
        g.reserve(name)
    # Final producer of each blob keeps the Caffe name; earlier (pre in-place) versions get suffixes.
    last_producer: dict[str, int] = {}
    for i, p in enumerate(plans):
        for t in p.tops:
            last_producer[t] = i
    current: dict[str, str] = {n: n for n in inputs}
    for n in last_producer:
        if n not in current:
            g.reserve(n)
    values: dict[str, np.ndarray] = {}
    if any(p.layer.param.type in SHAPE_ONLY for p in plans):
        values = _shape_only_values(net)
    for i, p in enumerate(plans):
        layer = p.layer
        if layer.is_input:
            continue
        tops = []
        for t in p.tops:
            if last_producer[t] == i and t not in inputs:
                tops.append(t)
            else:
                tops.append(g.fresh(f"{t}__{layer.name}"))
        L = OnnxLayer(param=layer.param, bottoms=[current[b] for b in p.bottoms], tops=tops,
                      bottom_shapes=[shapes[b] for b in p.bottoms], top_shapes=[shapes[t] for t in p.tops],
                      blobs=layer.dump_blobs(), g=g, values={tt: values[t] for tt, t in zip(tops, p.tops)
                                                               if t in values})
        try:
            CONVERTERS[layer.param.type](L)
        except CaffeportError as e:
            raise type(e)(f"{net.source}: {e}") from None
        for t, name in zip(p.tops, tops):
            current[t] = name
    outputs = list(net.outputs)

    def vinfo(name: str, shape: Sequence[int]) -> Any:
        dims: list[Any] = list(shape)
        if dynamic_batch and dims:
            dims[0] = "batch"
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)

    graph = onnx.helper.make_graph(
        g.nodes, graph_name or net.net_param.name or "caffe_net",
        [vinfo(n, shapes[n]) for n in inputs],
        [vinfo(current[n], shapes[n]) for n in outputs],
        initializer=g.initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="caffeport")
    model.ir_version = min(model.ir_version, _max_ir_version(opset))
    return OnnxExport(model=model, inputs=inputs, outputs=[current[n] for n in outputs])


def _max_ir_version(opset: int) -> int:
    # IR versions by default opset (onnx.helper.VERSION_TABLE): keep files loadable by older runtimes.
    table = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
    return table.get(opset, 10)


def _shape_only_values(net: Any) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        table = net.module.run({n: torch.zeros(net._shapes[n]) for n in net.inputs})
    return {t: table[t].detach().cpu().numpy() for p in net._plans if p.layer.param.type in SHAPE_ONLY
            for t in p.tops}


# --------------------------------------------------------------------------------------------------
# checking
# --------------------------------------------------------------------------------------------------
def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (the error relative to the output's scale)."""
    if got.shape != want.shape:
        return math.inf
    if want.size == 0:
        return 0.0
    scale = float(np.max(np.abs(want)))
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def check_onnx(export: OnnxExport, net: Any, *, batch_sizes: Sequence[int] | None = None, seed: int = 0,
               tol: float = 1e-4) -> float:
    """onnx.checker, then onnxruntime against caffeport's forward on random inputs (each batch size in
    ``batch_sizes`` when the model has a dynamic batch). Returns the max relative error; raises
    CaffeportError above ``tol``."""
    onnx = _onnx()
    import torch

    try:
        onnx.checker.check_model(export.model, full_check=True)
    except Exception as e:  # onnx raises its own ValidationError / InferenceError types
        raise CaffeportError(f"{net.source}: the exported ONNX model fails onnx.checker: {e}") from None
    export.checks.append("onnx.checker")
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise CaffeportError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(export.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in batch_sizes or [None]:
        feeds = {}
        for n in export.inputs:
            shape = list(net._shapes[n])
            if batch is not None and shape:
                shape[0] = batch
            feeds[n] = rng.standard_normal(shape).astype(np.float32)
        got = sess.run(export.outputs, feeds)
        with torch.no_grad():
            table = net.module.run({k: torch.from_numpy(v.copy()) for k, v in feeds.items()})
        for caffe_name, onnx_name, value in zip(net.outputs, export.outputs, got):
            want = table[caffe_name].detach().cpu().numpy()
            err = rel_error(value, want)
            if not err <= tol:
                raise CaffeportError(
                    f"{net.source}: ONNX output '{onnx_name}' differs from caffeport's forward"
                    f"{f' at batch {batch}' if batch else ''}: max relative error {err:.3g} > {tol:g}"
                    + (f" (shape {value.shape} vs {want.shape})" if value.shape != want.shape else "")
                )
            worst = max(worst, err)
        export.checks.append(f"onnxruntime{f' batch {batch}' if batch else ''}")
    export.max_rel_error = worst
    return worst


def save_onnx(export: OnnxExport, path: str | Path) -> None:
    """Write the model atomically (temp file, then rename)."""
    from caffeport.io.blobs import atomic_write

    data = export.model.SerializeToString()
    if len(data) >= 2**31:
        raise CaffeportError(f"{path}: the model is over 2 GB, which a single ONNX file cannot hold")
    atomic_write(path, data)
