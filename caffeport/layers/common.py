"""Common (non-vision) layers: shape plumbing, normalisation, linear maps and reductions.

Shapes follow Caffe's ``Reshape`` rules for each type; parameter blobs have Caffe's shapes and order.
Custom autograd functions appear only where Caffe's backward is not autograd's (Eltwise MAX ties,
Eltwise PROD without ``stable_prod_grad``, MVN's eps placement), plus fast training's
low-precision InnerProduct (reused buffers instead of fresh per-step allocations).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from caffeport.layers.base import TEST, Layer, Shape, blob_shape, register
from caffeport.proto import caffe_pb2

_Filler = caffe_pb2.FillerParameter


def _canon(layer: Layer, axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: -ndim <= axis < ndim, negatives count from the end."""
    if not -ndim <= axis < ndim:
        raise layer.error(f"{what} {axis} is out of range for a {ndim}-axis bottom")
    return axis + ndim if axis < 0 else axis


def _no_in_place(layer: Layer) -> None:
    """Caffe CHECKs that these layers' tops are not their bottom (in-place is an error)."""
    clash = set(layer.param.top) & set(layer.param.bottom)
    if clash:
        raise layer.error(f"does not allow in-place computation (top '{sorted(clash)[0]}' is also a bottom)")


def _count(shape: Shape, start: int = 0, end: int | None = None) -> int:
    return math.prod(shape[start:end])


# ---------------------------------------------------------------------------------------------
@register("ArgMax")
class ArgMax(Layer):
    """Top-k indices (or values) of each item (``count(1)`` flattened) or along ``axis``.

    Ties: Caffe sorts (value, index) pairs with ``std::greater``, so among equal values the LARGER
    index comes first (torch.topk leaves tie order unspecified). Without ``axis`` the top is
    ``(N, 1 or 2, top_k)`` padded with 1s to the bottom's axis count (at least 3); with
    ``out_max_val`` and no axis channel 0 holds indices and channel 1 values.
    """

    has_backward = False
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.argmax_param
        shape = bottom_shapes[0]
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        if self.top_k < 1:
            raise self.error("argmax_param.top_k must be at least 1")
        self.axis = _canon(self, int(p.axis), len(shape)) if p.HasField("axis") else None
        dim = shape[self.axis] if self.axis is not None else _count(shape, 1)
        if self.top_k > dim:
            raise self.error(f"argmax_param.top_k {self.top_k} exceeds the {dim} values it chooses from")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        if self.axis is not None:
            out = list(shape)
            out[self.axis] = self.top_k
            return [tuple(out)]
        out = [1] * max(len(shape), 3)
        out[0] = shape[0]
        out[2] = self.top_k
        if self.out_max_val:
            out[1] = 2
        return [tuple(out)]

    def _topk(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[dim]
        if self.top_k == 1:
            vals = x.amax(dim=dim, keepdim=True)
            ar = torch.arange(n, device=x.device).view([-1 if d == dim else 1 for d in range(x.dim())])
            idx = torch.where(x == vals, ar, -1).amax(dim=dim, keepdim=True)
            return vals, idx
        # Stable descending sort of the reversed axis puts the larger original index first on ties.
        vals, ridx = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        k = self.top_k
        return vals.narrow(dim, 0, k), (n - 1) - ridx.narrow(dim, 0, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.axis is not None:
            vals, idx = self._topk(x, self.axis)
            return vals if self.out_max_val else idx.to(x.dtype)
        flat = x.reshape(x.shape[0], -1)
        vals, idx = self._topk(flat, 1)
        out = torch.stack([idx.to(x.dtype), vals], dim=1) if self.out_max_val else idx.to(x.dtype).unsqueeze(1)
        return out.reshape(self.top_shapes([tuple(x.shape)])[0])


# ---------------------------------------------------------------------------------------------
@register("BatchNorm")
class BatchNorm(Layer):
    """Caffe's BatchNorm: no affine part, three blobs ``[mean_sum, var_sum, scale_factor]``.

    Statistics are ``blob / scale_factor`` (0 when the factor is 0). With batch statistics (default
    in TRAIN) it normalises with the batch mean and biased variance and updates the blobs in place:
    ``f = maf f + 1; mean_sum = maf mean_sum + mean; var_sum = maf var_sum + m/(m-1) var``
    (``m = count / C``) - not nn.BatchNorm's momentum EMA. ``eps`` is added to the variance.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.batch_norm_param
        shape = bottom_shapes[0]
        self.use_global_stats = bool(p.use_global_stats) if p.HasField("use_global_stats") else self.phase == TEST
        self.maf = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        self.channels = 1 if len(shape) == 1 else shape[1]
        for i, spec in enumerate(self.param.param[:3]):
            if spec.HasField("lr_mult") and spec.lr_mult != 0:
                raise self.error(f"param {i} has lr_mult {spec.lr_mult}: BatchNorm statistics cannot be "
                                 "learned parameters (lr_mult must be 0)")
        for s in ((self.channels,), (self.channels,), (1,)):
            self.add_blob(s, requires_grad=False)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        c = self.channels
        xr = x.reshape(n, c, -1)
        if self.use_global_stats:
            sf = self.blobs[2].detach()
            factor = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
            mean = self.blobs[0].detach() * factor
            var = self.blobs[1].detach() * factor
            # One fused pass (x - mean) * rsqrt(var + eps); backward dy / sqrt(var + eps) as Caffe's.
            return F.batch_norm(xr, mean, var, None, None, False, 0.0, self.eps).reshape(x.shape)
        mean = xr.mean(dim=(0, 2))
        centered = xr - mean.view(1, c, 1)
        var = (centered * centered).mean(dim=(0, 2))
        m = x.numel() // c
        corr = m / (m - 1) if m > 1 else 1.0
        with torch.no_grad():
            self.blobs[2].mul_(self.maf).add_(1.0)
            self.blobs[0].mul_(self.maf).add_(mean.detach())
            self.blobs[1].mul_(self.maf).add_(var.detach() * corr)
        std = torch.sqrt(var + self.eps)
        return (centered / std.view(1, c, 1)).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
@register("BatchReindex")
class BatchReindex(Layer):
    """``top[i] = bottom[0][index[i]]`` along axis 0 (indices stored as floats); repeated indices
    accumulate their diffs. The index bottom gets no gradient."""

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1
    no_grad_bottoms = (1,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if len(bottom_shapes[1]) != 1:
            raise self.error(f"the index bottom must be 1-D, got shape {bottom_shapes[1]}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(bottom_shapes[1][0],) + tuple(bottom_shapes[0][1:])]

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, index.detach().long())


# ---------------------------------------------------------------------------------------------
def _operand_view(layer: Layer, x_shape: Shape, p_shape: Shape, axis: int) -> list[int]:
    """Shape that broadcasts a Bias/Scale operand of ``p_shape`` over ``x_shape`` from ``axis``."""
    if len(p_shape) == 0:
        return [1] * len(x_shape)
    if axis + len(p_shape) > len(x_shape) or tuple(x_shape[axis:axis + len(p_shape)]) != tuple(p_shape):
        raise layer.error(f"operand shape {tuple(p_shape)} does not match bottom shape {tuple(x_shape)} "
                          f"starting at axis {axis}")
    return [1] * axis + list(p_shape) + [1] * (len(x_shape) - axis - len(p_shape))


def _operand_blob_shape(layer: Layer, shape: Shape, axis_param: int, num_axes: int) -> tuple[int, Shape]:
    axis = _canon(layer, axis_param, len(shape)) if len(shape) else 0
    if num_axes < -1:
        raise layer.error("num_axes must be non-negative, or -1 to extend to the end of bottom[0]")
    if num_axes >= 0 and axis + num_axes > len(shape):
        raise layer.error(f"num_axes {num_axes} from axis {axis} extends past the bottom's {len(shape)} axes")
    end = len(shape) if num_axes == -1 else axis + num_axes
    return axis, tuple(shape[axis:end])


@register("Bias")
class Bias(Layer):
    """``x + b`` with ``b`` broadcast from ``axis`` (a learned blob of shape
    ``x.shape[axis:axis+num_axes]``, or a second bottom). A 0-d bias applies everywhere."""

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.bias_param
        x_shape = bottom_shapes[0]
        if len(bottom_shapes) == 1:
            _, bshape = _operand_blob_shape(self, x_shape, int(p.axis), int(p.num_axes))
            self.add_blob(bshape, p.filler if p.HasField("filler") else None)
            self._axis_param = int(p.axis)
        else:
            self._axis_param = int(p.axis)
            self._view(x_shape, bottom_shapes[1])

    def _view(self, x_shape: Shape, b_shape: Shape) -> list[int]:
        axis = 0 if len(b_shape) == 0 else _canon(self, self._axis_param, len(x_shape))
        return _operand_view(self, x_shape, b_shape, axis)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        b = rest[0] if rest else self.blobs[0]
        return x + b.reshape(self._view(tuple(x.shape), tuple(b.shape)))


@register("Scale")
class Scale(Layer):
    """``x * s (+ b)`` with ``s`` broadcast from ``axis`` (learned blob, filler default constant 1,
    or a second bottom); ``bias_term`` (default false) adds a learned bias of ``s``'s shape, stored
    after the scale blob (blob 0 when the scale is a bottom)."""

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.scale_param
        x_shape = bottom_shapes[0]
        self._axis_param = int(p.axis)
        if len(bottom_shapes) == 1:
            _, sshape = _operand_blob_shape(self, x_shape, int(p.axis), int(p.num_axes))
            filler = p.filler if p.HasField("filler") else _Filler(type="constant", value=1.0)
            self.add_blob(sshape, filler)
        else:
            sshape = bottom_shapes[1]
            self._view(x_shape, sshape)
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            self.add_blob(sshape, p.bias_filler if p.HasField("bias_filler") else None)

    def _view(self, x_shape: Shape, s_shape: Shape) -> list[int]:
        axis = 0 if len(s_shape) == 0 else _canon(self, self._axis_param, len(x_shape))
        return _operand_view(self, x_shape, s_shape, axis)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        s = rest[0] if rest else self.blobs[0]
        view = self._view(tuple(x.shape), tuple(s.shape))
        if self.bias_term:
            return torch.addcmul(self.blobs[-1].reshape(view), x, s.reshape(view))  # one pass: b + x * s
        return x * s.reshape(view)


# ---------------------------------------------------------------------------------------------
def _legacy_axis(layer: Layer, p, legacy_field: str, shape: Shape) -> int:
    """``axis`` or the legacy ``concat_dim``/``slice_dim`` (never both)."""
    if p.HasField(legacy_field):
        if p.HasField("axis"):
            raise layer.error(f"either axis or {legacy_field} may be given, not both")
        axis = int(getattr(p, legacy_field))
        if axis >= len(shape):
            raise layer.error(f"{legacy_field} {axis} is out of range for a {len(shape)}-axis bottom")
        return axis
    return _canon(layer, int(p.axis), len(shape))


@register("Concat")
class Concat(Layer):
    """Concatenate along ``axis`` (legacy ``concat_dim``); other axes must match."""

    min_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.axis = _legacy_axis(self, self.param.concat_param, "concat_dim", bottom_shapes[0])
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        first = bottom_shapes[0]
        total = 0
        for i, s in enumerate(bottom_shapes):
            if len(s) != len(first) or any(a != b for j, (a, b) in enumerate(zip(s, first)) if j != self.axis):
                raise self.error(f"bottom {i} has shape {s}, incompatible with bottom 0 {first} for "
                                 f"concatenation along axis {self.axis}")
            total += s[self.axis]
        out = list(first)
        out[self.axis] = total
        return [tuple(out)]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if len(xs) == 1:
            return xs[0].view_as(xs[0])
        return torch.cat(xs, dim=self.axis)


# ---------------------------------------------------------------------------------------------
class _EltwiseMaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> torch.Tensor:
        a, b = xs[0], xs[1]
        a_wins = a > b
        top = torch.where(a_wins, a, b)
        mask = torch.where(a_wins, 0, 1).to(torch.uint8)
        for k in range(2, len(xs)):
            upd = xs[k] > top
            top = torch.where(upd, xs[k], top)
            mask = torch.where(upd, k, mask).to(torch.uint8)
        ctx.save_for_backward(mask)
        ctx.n = len(xs)
        return top

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (mask,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        return tuple(torch.where(mask == k, g, zero) if ctx.needs_input_grad[k] else None for k in range(ctx.n))


class _EltwiseProdUnstableFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> torch.Tensor:
        top = xs[0] * xs[1]
        for x in xs[2:]:
            top = top * x
        ctx.save_for_backward(top, *xs)
        return top

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        top, *xs = ctx.saved_tensors
        return tuple(g * (top / x) if ctx.needs_input_grad[k] else None for k, x in enumerate(xs))


@register("Eltwise")
class Eltwise(Layer):
    """Element-wise SUM (optional per-bottom ``coeff``), PROD or MAX of >= 2 same-shape bottoms.

    MAX ties follow Caffe's loop: bottom 1 wins a tie against bottom 0 (``a > b`` keeps a, else b),
    later bottoms must be strictly greater; the whole diff goes to the winner. PROD with
    ``stable_prod_grad: false`` uses Caffe's ``top / x`` gradient (inf/NaN at zeros).
    """

    min_bottoms = 2
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.eltwise_param
        self.op = p.operation
        n = len(bottom_shapes)
        if len(p.coeff) and len(p.coeff) != n:
            raise self.error(f"eltwise_param has {len(p.coeff)} coeff for {n} bottoms (need one per bottom)")
        if len(p.coeff) and self.op == caffe_pb2.EltwiseParameter.PROD:
            raise self.error("eltwise_param.coeff is only for operation SUM (Caffe ignores it for MAX)")
        self.coeff = [float(c) for c in p.coeff] or [1.0] * n
        self.stable = bool(p.stable_prod_grad)
        for i, s in enumerate(bottom_shapes[1:], 1):
            if s != bottom_shapes[0]:
                raise self.error(f"bottom {i} has shape {s}, bottom 0 {bottom_shapes[0]}: Eltwise needs equal shapes")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        op = self.op
        if op == caffe_pb2.EltwiseParameter.SUM:
            c = self.coeff
            out = xs[0] if c[0] == 1.0 else xs[0] * c[0]
            for x, k in zip(xs[1:], c[1:]):
                out = torch.add(out, x, alpha=k) if k != 1.0 else out + x
            return out
        if op == caffe_pb2.EltwiseParameter.PROD:
            if not self.stable:
                return _EltwiseProdUnstableFn.apply(*xs)
            out = xs[0] * xs[1]
            for x in xs[2:]:
                out = out * x
            return out
        if op == caffe_pb2.EltwiseParameter.MAX:
            return _EltwiseMaxFn.apply(*xs)
        raise self.error(f"unknown eltwise operation {op}")


# ---------------------------------------------------------------------------------------------
@register("Embed")
class Embed(Layer):
    """Lookup table: weight ``(input_dim, num_output)``, optional bias ``(num_output,)``; the
    index bottom holds floats and gets no gradient; repeated indices accumulate weight diffs.
    Top shape is the bottom's shape plus ``num_output``."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1
    no_grad_bottoms = (0,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.embed_param
        self.num_output, self.input_dim = int(p.num_output), int(p.input_dim)
        if self.num_output <= 0:
            raise self.error("embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise self.error("embed_param.input_dim must be positive")
        self.bias_term = bool(p.bias_term)
        self.add_blob((self.input_dim, self.num_output), p.weight_filler if p.HasField("weight_filler") else None)
        if self.bias_term:
            self.add_blob((self.num_output,), p.bias_filler if p.HasField("bias_filler") else None)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(bottom_shapes[0]) + (self.num_output,)]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = F.embedding(idx.detach().long(), self.blobs[0])
        if self.bias_term:
            y = y + self.blobs[1]
        return y


# ---------------------------------------------------------------------------------------------
@register("Filter")
class Filter(Layer):
    """Keep the items (axis 0) whose selector (the LAST bottom) is non-zero, for every other bottom.

    The top batch size depends on the data; at net set-up (no data yet) Caffe sizes the tops with
    the full batch, as ``top_shapes`` does. The selector never gets a gradient.
    """

    min_bottoms = 2
    min_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if len(self.param.top) != len(bottom_shapes) - 1:
            raise self.error(f"needs one top per filtered bottom: {len(bottom_shapes) - 1} bottoms "
                             f"besides the selector, {len(self.param.top)} tops")
        sel = bottom_shapes[-1]
        if any(d != 1 for d in sel[1:]):
            raise self.error(f"selector dimensions must be singletons except the first, got {sel}")
        for i, s in enumerate(bottom_shapes[:-1]):
            if not s or s[0] != sel[0]:
                raise self.error(f"bottom {i} has shape {s}: every bottom needs the selector's first "
                                 f"dimension {sel[0]}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(s) for s in bottom_shapes[:-1]]

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sel = bottoms[-1].detach().reshape(bottoms[-1].shape[0])
        idx = torch.nonzero(sel != 0).reshape(-1)
        return tuple(b.index_select(0, idx) for b in bottoms[:-1])


# ---------------------------------------------------------------------------------------------
@register("Flatten")
class Flatten(Layer):
    """Collapse axes ``axis..end_axis`` (inclusive, default 1..-1) into one."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        _no_in_place(self)
        p = self.param.flatten_param
        self._axis, self._end_axis = int(p.axis), int(p.end_axis)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        a = _canon(self, self._axis, len(shape), "flatten_param.axis")
        e = _canon(self, self._end_axis, len(shape), "flatten_param.end_axis")
        return [tuple(shape[:a]) + (_count(shape, a, e + 1),) + tuple(shape[e + 1:])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.top_shapes([tuple(x.shape)])[0])


# ---------------------------------------------------------------------------------------------
@register("InnerProduct")
class InnerProduct(Layer):
    """Fully connected: flattens axes ``axis..`` into K; weight ``(N, K)``, or ``(K, N)`` with
    ``transpose: true``; top shape ``bottom.shape[:axis] + (N,)``."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.inner_product_param
        shape = bottom_shapes[0]
        self.axis = _canon(self, int(p.axis), len(shape), "inner_product_param.axis")
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("inner_product_param.num_output must be positive")
        self.k = _count(shape, self.axis)
        self.transpose = bool(p.transpose)
        self.bias_term = bool(p.bias_term)
        wshape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.add_blob(wshape, p.weight_filler if p.HasField("weight_filler") else None)
        if self.bias_term:
            self.add_blob((self.num_output,), p.bias_filler if p.HasField("bias_filler") else None)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        if _count(shape, self.axis) != self.k:
            raise self.error(f"input size {_count(shape, self.axis)} (bottom {shape} from axis {self.axis}) "
                             f"is incompatible with the weights' K = {self.k}")
        return [tuple(shape[:self.axis]) + (self.num_output,)]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The bottom as the ``(M, K)`` matrix Caffe's GEMM reads."""
        lead = x.shape[:self.axis]
        if self.k == 0:  # K = 0 (a 0-sized bottom): -1 is ambiguous; Caffe's GEMM adds nothing -> bias
            return x.reshape(math.prod(int(d) for d in lead) if self.axis > 0 else 1, 0)
        return x.reshape(-1, self.k) if self.axis > 0 else x.reshape(1, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._rows(x)
        w = self.blobs[0]
        b = self.blobs[1] if self.bias_term else None
        if self.transpose:
            y = x2 @ w
            if b is not None:
                y = y + b
        else:
            y = F.linear(x2, w, b)
        return y.reshape(tuple(x.shape[:self.axis]) + (self.num_output,))

    def forward_low_precision(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Fast training's forward (eager, CPU): the three GEMMs in ``dtype`` with float32 top, bias
        and gradients, the weight's low-precision copy and gradient kept in buffers reused every step
        (a fresh 100+ MB tensor per step costs more in page faults than its GEMM; see _LowPrecisionIP)."""
        x2 = self._rows(x)
        b = self.blobs[1] if self.bias_term else None
        bufs = self.__dict__.setdefault("_low_precision_buffers", {})
        y = _LowPrecisionIP.apply(x2, self.blobs[0], b, self.transpose, dtype, bufs)
        return y.reshape(tuple(x.shape[:self.axis]) + (self.num_output,))


def _buffer(bufs: dict[str, Any], key: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b = bufs.get(key)
    if b is None or b.shape != like.shape or b.dtype != dtype or b.device != like.device:
        b = bufs[key] = torch.empty(like.shape, dtype=dtype, device=like.device)
    return b


class _LowPrecisionIP(torch.autograd.Function):
    """InnerProduct with its GEMMs in a low-precision ``dtype``: ``y = x W^T + b`` (``x W + b`` when
    transposed). The top, the bias and every gradient returned are float32 (the weight gradient is
    the low-precision GEMM's result widened).

    The low-precision weight copy and the weight gradient live in buffers reused from step to step:
    every forward rewrites the copy (graphs still alive see the same values while the weight is
    unchanged; a weight changed in place before an older graph's backward raises, as autograd would),
    and only the newest forward's backward writes the shared gradient buffer (older graphs of the
    same layer, e.g. two forwards summed into one loss, get fresh gradients). The gradient handed to
    autograd is overwritten by the next backward: accumulate it (``.grad``, as the solver does)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transpose: bool,
                dtype: torch.dtype, bufs: dict[str, Any]) -> torch.Tensor:
        wl = _buffer(bufs, "weight", w, dtype)
        wl.copy_(w)
        xl = x2.to(dtype)
        y = (xl @ wl if transpose else xl @ wl.t()).float()
        if b is not None:
            y = y + b
        ctx.save_for_backward(xl)
        bufs["forwards"] = bufs.get("forwards", 0) + 1
        ctx.wl, ctx.w, ctx.w_version, ctx.generation = wl, w, w._version, bufs["forwards"]
        ctx.transpose, ctx.bufs, ctx.has_bias = transpose, bufs, b is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # Caffe has no second derivatives
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (xl,) = ctx.saved_tensors
        wl = ctx.wl
        if ctx.w._version != ctx.w_version:
            raise RuntimeError("InnerProduct (fast training): its weight was modified by an inplace operation "
                               "between this forward and its backward")
        gl = g.to(wl.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gl @ wl.t() if ctx.transpose else gl @ wl).float()
        if ctx.needs_input_grad[1]:
            a, b = (xl.t(), gl) if ctx.transpose else (gl.t(), xl)
            if ctx.generation == ctx.bufs["forwards"]:  # the newest forward: into the shared buffers
                gw = _buffer(ctx.bufs, "weight_diff", wl, torch.float32)
                gw.copy_(torch.mm(a, b, out=_buffer(ctx.bufs, "weight_diff_low", wl, wl.dtype)))
            else:  # an older graph of this layer: fresh tensors
                gw = torch.mm(a, b).float()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None, None, None


# ---------------------------------------------------------------------------------------------
class _MVNFn(torch.autograd.Function):
    """Mean/variance normalisation of the rows of a 2-D tensor with Caffe's gradient:
    ``(dy - mean(dy) - y mean(y dy)) / (std + eps)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        c = x - x.mean(dim=1, keepdim=True)
        denom = torch.sqrt((c * c).mean(dim=1, keepdim=True)) + eps
        y = c / denom
        ctx.save_for_backward(y, denom)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        y, denom = ctx.saved_tensors
        dx = g - g.mean(dim=1, keepdim=True) - y * (y * g).mean(dim=1, keepdim=True)
        return dx / denom, None


@register("MVN")
class MVN(Layer):
    """Subtract the mean (per item, or per item and channel unless ``across_channels``) and, with
    ``normalize_variance``, divide by ``std + eps`` - eps is added to the standard deviation, not
    to the variance. Caffe's backward drops eps's contribution (see ``_MVNFn``)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        num = shape[0] if (self.across_channels or x.dim() < 2) else shape[0] * shape[1]
        xr = x.reshape(num, -1)
        if self.normalize_variance:
            y = _MVNFn.apply(xr, self.eps)
        else:
            y = xr - xr.mean(dim=1, keepdim=True)
        return y.reshape(shape)


# ---------------------------------------------------------------------------------------------
@register("Parameter")
class Parameter(Layer):
    """No bottoms; the top IS the blob (``parameter_param.shape``, zero-initialised), so the top's
    diff is the blob's diff."""

    max_bottoms = 0
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.add_blob(blob_shape(self.param.parameter_param.shape))

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(self.blobs[0].shape)]

    def forward(self) -> torch.Tensor:
        return self.blobs[0]


# ---------------------------------------------------------------------------------------------
@register("Reduction")
class Reduction(Layer):
    """Reduce ALL axes from ``axis`` on (not just one) with SUM, ASUM, SUMSQ or MEAN, times
    ``coeff``; top shape ``bottom.shape[:axis]`` (``axis 0`` gives a 0-d scalar)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.reduction_param
        shape = bottom_shapes[0]
        self.axis = _canon(self, int(p.axis), len(shape), "reduction_param.axis") if len(shape) else 0
        self.op = p.operation
        if self.op not in (caffe_pb2.ReductionParameter.SUM, caffe_pb2.ReductionParameter.ASUM,
                           caffe_pb2.ReductionParameter.SUMSQ, caffe_pb2.ReductionParameter.MEAN):
            raise self.error(f"unknown reduction operation {self.op}")
        self.coeff = float(p.coeff)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(bottom_shapes[0][:self.axis])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = tuple(x.shape[:self.axis])
        xr = x.reshape(lead + (-1,))
        op = self.op
        coeff = self.coeff
        R = caffe_pb2.ReductionParameter
        if op == R.SUM or op == R.MEAN:
            y = xr.sum(dim=-1)
            if op == R.MEAN:
                coeff = coeff / max(xr.shape[-1], 1)
        elif op == R.ASUM:
            y = xr.abs().sum(dim=-1)
        else:
            y = (xr * xr).sum(dim=-1)
        return y * coeff if coeff != 1.0 else y


# ---------------------------------------------------------------------------------------------
@register("Reshape")
class Reshape(Layer):
    """Replace axes ``axis .. axis+num_axes`` by ``reshape_param.shape``: ``0`` copies the bottom's
    dimension at that position, one ``-1`` is inferred. The data is shared (a view)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        _no_in_place(self)
        dims = list(blob_shape(self.param.reshape_param.shape))
        if sum(d == -1 for d in dims) > 1:
            raise self.error("reshape_param.shape has more than one -1 (only one dimension can be inferred)")
        if any(d < -1 for d in dims):
            raise self.error(f"reshape_param.shape has an invalid dimension in {dims}")
        self.dims = dims
        p = self.param.reshape_param
        self._axis, self._num_axes = int(p.axis), int(p.num_axes)
        if self._num_axes < -1:
            raise self.error("reshape_param.num_axes must be >= 0, or -1 for all")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        nd = len(shape)
        start = self._axis if self._axis >= 0 else nd + self._axis + 1
        if not 0 <= start <= nd:
            raise self.error(f"reshape_param.axis {self._axis} is out of range for a {nd}-axis bottom")
        end = nd if self._num_axes == -1 else start + self._num_axes
        if end > nd:
            raise self.error(f"reshape_param.axis + num_axes ({end}) exceeds the bottom's {nd} axes")
        new = []
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= nd:
                    raise self.error(f"reshape_param.shape dim {i} is 0 (copy) but the bottom has no axis {start + i}")
                new.append(shape[start + i])
            else:
                new.append(d)
        out = list(shape[:start]) + new + list(shape[end:])
        total = _count(shape)
        if -1 in new:
            known = math.prod(d for d in out if d != -1)
            if known == 0 or total % known:
                raise self.error(f"bottom count {total} (shape {shape}) is not divisible by the product "
                                 f"of the given dimensions {known}")
            out[start + new.index(-1)] = total // known
        if _count(tuple(out)) != total:
            raise self.error(f"output count {_count(tuple(out))} (shape {tuple(out)}) differs from the bottom's "
                             f"{total} (shape {shape})")
        return [tuple(out)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Validated by top_shapes at set-up; here 0 copies and torch infers the -1.
        nd = x.dim()
        start = self._axis if self._axis >= 0 else nd + self._axis + 1
        end = nd if self._num_axes == -1 else start + self._num_axes
        mid = [x.shape[start + i] if d == 0 else d for i, d in enumerate(self.dims)]
        return x.reshape(list(x.shape[:start]) + mid + list(x.shape[end:]))


# ---------------------------------------------------------------------------------------------
@register("Silence")
class Silence(Layer):
    """Consumes its bottoms and produces nothing; the bottoms' diffs are zero."""

    min_bottoms = 1
    max_tops = 0

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return []

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ()


# ---------------------------------------------------------------------------------------------
@register("Slice")
class Slice(Layer):
    """Split along ``axis`` (legacy ``slice_dim``) at the ``slice_point`` positions, or into equal
    parts when none are given."""

    min_bottoms = max_bottoms = 1
    min_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.slice_param
        self.axis = _legacy_axis(self, p, "slice_dim", bottom_shapes[0])
        self.points = [int(s) for s in p.slice_point]
        self.n_top = n_top = len(self.param.top)
        if self.points and len(self.points) != n_top - 1:
            raise self.error(f"{len(self.points)} slice_point for {n_top} tops (need {n_top - 1})")
        self.top_shapes(bottom_shapes)

    def _sizes(self, dim: int) -> list[int]:
        n_top = self.n_top
        if not self.points:
            if dim % n_top:
                raise self.error(f"axis {self.axis} of size {dim} cannot be split equally into {n_top} tops")
            return [dim // n_top] * n_top
        bounds = [0] + self.points + [dim]
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if any(s <= 0 for s in sizes):
            raise self.error(f"slice_point {self.points} must increase strictly inside (0, {dim})")
        return sizes

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        out = []
        for s in self._sizes(shape[self.axis]):
            t = list(shape)
            t[self.axis] = s
            out.append(tuple(t))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = self._sizes(x.shape[self.axis])
        if len(sizes) == 1:
            return (x.view_as(x),)
        return tuple(torch.split(x, sizes, dim=self.axis))


# ---------------------------------------------------------------------------------------------
@register("Softmax")
class Softmax(Layer):
    """Softmax along ``axis`` (default 1), max-subtracted as Caffe; backward
    ``(dy - sum(dy y)) y``."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.axis = _canon(self, int(self.param.softmax_param.axis), len(bottom_shapes[0]), "softmax_param.axis")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=self.axis)


# ---------------------------------------------------------------------------------------------
@register("Split")
class Split(Layer):
    """Every top is the bottom (shared data, no copy); each top keeps its own diff and the bottom's
    diff is their sum."""

    min_bottoms = max_bottoms = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        _no_in_place(self)
        self.n_top = len(self.param.top)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]] * self.n_top

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.view_as(x) for _ in range(self.n_top))


# ---------------------------------------------------------------------------------------------
@register("Tile")
class Tile(Layer):
    """Repeat the block of axes ``axis..`` ``tiles`` times along ``axis`` (torch ``repeat``)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.tile_param
        self.axis = _canon(self, int(p.axis), len(bottom_shapes[0]), "tile_param.axis")
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles must be specified")
        self.tiles = int(p.tiles)
        if self.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {self.tiles}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = list(bottom_shapes[0])
        s[self.axis] *= self.tiles
        return [tuple(s)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reps = [1] * x.dim()
        reps[self.axis] = self.tiles
        return x.repeat(reps)

