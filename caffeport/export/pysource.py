"""A deploy net as generated, readable PyTorch source (``caffeport export-torch --python``).

:func:`generate_source` writes one ``torch.nn.Module`` class ``Net`` with one attribute per Caffe
layer (the layer name made a valid identifier; ``CAFFE_LAYERS`` in the file maps back) and a
``forward(**inputs)`` returning ``{output blob: tensor}``; the file imports only torch and the
standard library. Standard ``torch.nn`` modules are used where their numbers are Caffe's
(``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``, ``nn.MaxPool2d`` when torch's ceil rule gives
Caffe's size, ...); small helper modules, emitted into the file only when used, cover the rest
(:data:`HELPERS`): Caffe's pooling size/pad/divisor rules, LRN WITHIN_CHANNEL, Eltwise coeffs,
Scale/Bias axis broadcasting, Reshape's 0/-1 rule, Power/Exp/Log, ...

Per-type knowledge lives in :data:`SOURCE_FORMS` (keyed by Caffe type, as the ONNX converters):
a form gets a :class:`PyLayer` (the instantiated caffeport layer, its param, shapes) and returns a
:class:`Form`: the constructor expression, the helper modules it needs and the attribute's
``state_dict`` entries. Types with no form (Python layers; data/loss layers, which the deploy
derivation removes first) are reported by name (:data:`NO_SOURCE_FORM`).

``export_python(..., optimize=True)`` (``export-torch --python --optimize``) generates the source of
the net after :func:`caffeport.passes.optimize_net` (BatchNorm/Scale/Bias/Power folded into the
preceding conv/fc, TEST Dropout dropped: fewer modules, no BatchNorm between conv and ReLU), and
checks it against the exact net within :data:`OPTIMIZE_TOL` (1e-4 relative; folding changes fp32
rounding, so it is not bit for bit what Caffe computes).

Where the generated code differs from caffeport: gradients are autograd's (Caffe's special
backward rules - Power at 0, ELU's, MVN's eps, Eltwise MAX ties - are not reproduced); nn.BatchNorm
updates running statistics with torch's momentum rule if trained (Caffe accumulates sums); random
layers (Dropout) use torch's RNG; LSTM/RNN start every call from zero state (Caffe carries the last
state into the next forward unless the state is exposed).
"""

from __future__ import annotations

import keyword
import math
import os
import re
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.export.common import layers_without_form
from caffeport.proto import caffe_pb2

PathLike = str | os.PathLike

_PP = caffe_pb2.PoolingParameter


class NoSourceForm(CaffeportError):
    """A layer (or one of its settings) with no plain-PyTorch form in the generator."""


# --------------------------------------------------------------------------------------------------
# helper modules written into the generated file (only those a net uses)
# --------------------------------------------------------------------------------------------------
@dataclass
class Helper:
    source: str
    deps: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()  # "F", "math"


HELPERS: dict[str, Helper] = {}


def helper(name: str, source: str, deps: Sequence[str] = (), imports: Sequence[str] = ()) -> None:
    HELPERS[name] = Helper(textwrap.dedent(source).strip("\n"), tuple(deps), tuple(imports))


helper("caffe_pool2d", '''
    def caffe_pool2d(x, method, kernel, stride, pad, ceil=True, mask=False):
        """Caffe's Pooling on (N, C, H, W). Output size (H + 2p - k) / s + 1 rounded up (CEIL) or
        down; with any padding the last window is dropped if it starts in the padding. MAX: first
        maximum wins, empty windows give -FLT_MAX; AVE: the divisor is the window clipped to
        H + pad (padding counts, ceil overflow does not); STOCHASTIC (TEST): sum(x^2) / sum(x).
        mask=True also returns the argmax's flat index into H*W (as float)."""
        H, W = x.shape[-2], x.shape[-1]
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad

        def size(n, k, s, p):
            q = n + 2 * p - k
            o = (-(-q // s) if ceil else q // s) + 1
            if (ph or pw) and (o - 1) * s >= n + p:
                o -= 1
            return o

        oh, ow = size(H, kh, sh, ph), size(W, kw, sw, pw)
        rh, rw = (oh - 1) * sh + kh - H - ph, (ow - 1) * sw + kw - W - pw
        if method == "max":
            xp = F.pad(x, (pw, rw, ph, rh), value=-math.inf)
            y, idx = F.max_pool2d(xp, (kh, kw), (sh, sw), return_indices=True)
            hs = torch.arange(oh, device=x.device) * sh - ph >= H
            ws = torch.arange(ow, device=x.device) * sw - pw >= W
            empty = hs[:, None] | ws[None, :]
            y = torch.where(empty, torch.full_like(y, -3.4028234663852886e38), y)
            if not mask:
                return y
            wp = W + pw + rw
            m = (idx // wp - ph) * W + (idx % wp - pw)
            return y, torch.where(empty, torch.full_like(m, -1), m).to(x.dtype)
        if method == "ave":
            xp = F.pad(x, (pw, rw, ph, rh))
            total = F.avg_pool2d(xp, (kh, kw), (sh, sw), divisor_override=1)
            hs = torch.arange(oh, device=x.device) * sh - ph
            ws = torch.arange(ow, device=x.device) * sw - pw
            dh = torch.clamp(hs + kh, max=H + ph) - hs
            dw = torch.clamp(ws + kw, max=W + pw) - ws
            return total / (dh[:, None] * dw[None, :]).to(x.dtype)
        xp = F.pad(x, (0, rw, 0, rh))
        s1 = F.avg_pool2d(xp, (kh, kw), (sh, sw), divisor_override=1)
        s2 = F.avg_pool2d(xp * xp, (kh, kw), (sh, sw), divisor_override=1)
        return s2 / (s1 + 1.1754943508222875e-38)
''', imports=("F", "math"))

helper("CaffePool2d", '''
    class CaffePool2d(nn.Module):
        """Caffe's Pooling where nn.MaxPool2d/AvgPool2d differ (see caffe_pool2d)."""

        def __init__(self, method, kernel=None, stride=(1, 1), pad=(0, 0), ceil=True, mask=False):
            super().__init__()
            self.method, self.kernel, self.stride, self.pad = method, kernel, stride, pad
            self.ceil, self.mask = ceil, mask

        def forward(self, x):
            kernel = self.kernel or (x.shape[-2], x.shape[-1])  # None: global pooling
            return caffe_pool2d(x, self.method, kernel, self.stride, self.pad, self.ceil, self.mask)
''', deps=("caffe_pool2d",))

helper("SPP", '''
    class SPP(nn.Module):
        """Caffe's spatial pyramid pooling: level l has 2^l bins per axis, kernel = stride =
        ceil(H / 2^l), pad = (kernel * 2^l - H + 1) // 2, levels flattened and concatenated."""

        def __init__(self, method, pyramid_height):
            super().__init__()
            self.method, self.height = method, pyramid_height

        def forward(self, x):
            H, W = x.shape[-2], x.shape[-1]
            outs = []
            for level in range(self.height):
                bins = 2**level
                kh, kw = -(-H // bins), -(-W // bins)
                pad = ((kh * bins - H + 1) // 2, (kw * bins - W + 1) // 2)
                y = caffe_pool2d(x, self.method, (kh, kw), (kh, kw), pad)
                if self.height == 1:
                    return y
                outs.append(y.flatten(1))
            return torch.cat(outs, dim=1)
''', deps=("caffe_pool2d",))

helper("LRNWithinChannel", '''
    class LRNWithinChannel(nn.Module):
        """Caffe's LRN WITHIN_CHANNEL: x * (1 + alpha * avg_pool(x^2))^-beta over a size x size
        window padded by (size - 1) // 2, always dividing by size^2; k is not used."""

        def __init__(self, size, alpha, beta):
            super().__init__()
            self.size, self.alpha, self.beta = size, alpha, beta

        def forward(self, x):
            p = (self.size - 1) // 2
            avg = F.avg_pool2d(x * x, self.size, 1, p, ceil_mode=True, count_include_pad=True)
            return x * torch.pow(1.0 + self.alpha * avg, -self.beta)
''', imports=("F",))

helper("Crop", '''
    class Crop(nn.Module):
        """Caffe's Crop: x cut to ref's size on the axes from `axis` on, starting at `offsets`."""

        def __init__(self, axis, offsets):
            super().__init__()
            self.axis, self.offsets = axis, offsets

        def forward(self, x, ref):
            idx = [slice(None)] * self.axis
            for i, off in enumerate(self.offsets):
                idx.append(slice(off, off + ref.shape[self.axis + i]))
            return x[tuple(idx)]
''')

helper("Im2col", '''
    class Im2col(nn.Module):
        """Caffe's Im2col layer: (N, C * prod(k), *out) with channel-major rows (c, k1, k2, ...)."""

        def __init__(self, kernel, stride, pad, dilation, axis=1):
            super().__init__()
            self.kernel, self.stride, self.pad, self.dilation = kernel, stride, pad, dilation
            self.axis = axis

        def forward(self, x):
            n = len(self.kernel)
            lead = x.shape[: self.axis + 1]
            x = x.reshape(-1, *x.shape[self.axis + 1:])
            pads = []
            for p in reversed(self.pad):
                pads += [p, p]
            x = F.pad(x, pads)
            for i in range(n):
                ext = self.dilation[i] * (self.kernel[i] - 1) + 1
                x = x.unfold(1 + i, ext, self.stride[i])
                x = x[..., :: self.dilation[i]]
            x = x.permute([0, *range(1 + n, 1 + 2 * n), *range(1, 1 + n)])
            k = 1
            for v in self.kernel:
                k *= v
            return x.reshape(*lead[:-1], lead[-1] * k, *x.shape[1 + n:])
''', imports=("F",))

helper("AbsVal", '''
    class AbsVal(nn.Module):
        def forward(self, x):
            return torch.abs(x)
''')

helper("Swish", '''
    class Swish(nn.Module):
        """x * sigmoid(beta * x)."""

        def __init__(self, beta):
            super().__init__()
            self.beta = beta

        def forward(self, x):
            return x * torch.sigmoid(self.beta * x)
''')

helper("Threshold", '''
    class Threshold(nn.Module):
        """Caffe's Threshold: 1 where x > threshold, else 0 (nn.Threshold is a different op)."""

        def __init__(self, threshold):
            super().__init__()
            self.threshold = threshold

        def forward(self, x):
            return (x > self.threshold).to(x.dtype)
''')

helper("Power", '''
    class Power(nn.Module):
        """Caffe's Power: (shift + scale * x) ** power (power 0 or scale 0: a constant)."""

        def __init__(self, power, scale, shift):
            super().__init__()
            self.power, self.scale, self.shift = power, scale, shift

        def forward(self, x):
            if self.power * self.scale == 0.0:
                return torch.full_like(x, 1.0 if self.power == 0.0 else self.shift**self.power)
            return torch.pow(x * self.scale + self.shift, self.power)
''')

helper("Exp", '''
    class Exp(nn.Module):
        """Caffe's Exp: base ** (shift + scale * x) = outer * exp(inner * x)."""

        def __init__(self, inner, outer):
            super().__init__()
            self.inner, self.outer = inner, outer

        def forward(self, x):
            return torch.exp(x * self.inner) * self.outer
''')

helper("Log", '''
    class Log(nn.Module):
        """Caffe's Log: log_base(shift + scale * x) = ln(shift + scale * x) * base_scale."""

        def __init__(self, scale, shift, base_scale):
            super().__init__()
            self.scale, self.shift, self.base_scale = scale, shift, base_scale

        def forward(self, x):
            return torch.log(x * self.scale + self.shift) * self.base_scale
''')

helper("DropoutScaleAtTest", '''
    class DropoutScaleAtTest(nn.Module):
        """Fast R-CNN's Dropout with scale_train: false: training keeps values unscaled, eval
        multiplies by 1 - p."""

        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            if self.training:
                return x * (torch.rand_like(x) >= self.p).to(x.dtype)
            return x * (1.0 - self.p)
''')

helper("Concat", '''
    class Concat(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim

        def forward(self, *xs):
            return torch.cat(xs, dim=self.dim)
''')

helper("Slice", '''
    class Slice(nn.Module):
        """Caffe's Slice: split `dim` at `points`, or into `parts` equal parts."""

        def __init__(self, dim, points, parts):
            super().__init__()
            self.dim, self.points, self.parts = dim, points, parts

        def forward(self, x):
            n = x.shape[self.dim]
            if self.points:
                bounds = [0, *self.points, n]
                sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            else:
                sizes = [n // self.parts] * self.parts
            return tuple(torch.split(x, sizes, dim=self.dim))
''')

helper("Eltwise", '''
    class Eltwise(nn.Module):
        """Caffe's Eltwise: "sum" with one coefficient per input, "prod" or "max"."""

        def __init__(self, op, coeffs=None):
            super().__init__()
            self.op, self.coeffs = op, coeffs

        def forward(self, *xs):
            if self.op == "prod":
                out = xs[0]
                for x in xs[1:]:
                    out = out * x
                return out
            if self.op == "max":
                out = xs[0]
                for x in xs[1:]:
                    out = torch.maximum(out, x)
                return out
            coeffs = self.coeffs or [1.0] * len(xs)
            out = xs[0] * coeffs[0] if coeffs[0] != 1.0 else xs[0]
            for x, c in zip(xs[1:], coeffs[1:]):
                out = out + x * c if c != 1.0 else out + x
            return out
''')

helper("Reshape", '''
    class Reshape(nn.Module):
        """Caffe's Reshape: axes axis .. axis + num_axes (-1: to the end) become `dims`, where 0
        copies the input's dimension at that position and one -1 is inferred."""

        def __init__(self, dims, axis=0, num_axes=-1):
            super().__init__()
            self.dims, self.axis, self.num_axes = dims, axis, num_axes

        def forward(self, x):
            nd = x.dim()
            start = self.axis if self.axis >= 0 else nd + self.axis + 1
            end = nd if self.num_axes == -1 else start + self.num_axes
            mid = [x.shape[start + i] if d == 0 else d for i, d in enumerate(self.dims)]
            return x.reshape(list(x.shape[:start]) + mid + list(x.shape[end:]))
''')

helper("Permute", '''
    class Permute(nn.Module):
        def __init__(self, order):
            super().__init__()
            self.order = order

        def forward(self, x):
            return x.permute(self.order).contiguous()
''')

helper("_broadcast", '''
    def _broadcast(p, x, axis):
        """p (shape x.shape[axis:axis + p.dim()]) viewed to broadcast over x, Caffe's Scale/Bias."""
        if p.dim() == 0:
            return p
        return p.reshape(*p.shape, *([1] * (x.dim() - axis - p.dim())))
''')

helper("Scale", '''
    class Scale(nn.Module):
        """Caffe's Scale: x * weight (+ bias), weight broadcast from `axis` (or a second input)."""

        def __init__(self, axis, shape=None, bias_shape=None):
            super().__init__()
            self.axis = axis
            self.weight = nn.Parameter(torch.ones(shape)) if shape is not None else None
            self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape is not None else None

        def forward(self, x, scale=None):
            s = self.weight if scale is None else scale
            axis = x.dim() if s.dim() == 0 else self.axis
            if self.bias is not None:  # one fused pass, bias + x * s
                return torch.addcmul(_broadcast(self.bias, x, axis), x, _broadcast(s, x, axis))
            return x * _broadcast(s, x, axis)
''', deps=("_broadcast",))

helper("Bias", '''
    class Bias(nn.Module):
        """Caffe's Bias: x + bias broadcast from `axis` (or a second input)."""

        def __init__(self, axis, shape=None):
            super().__init__()
            self.axis = axis
            self.bias = nn.Parameter(torch.zeros(shape)) if shape is not None else None

        def forward(self, x, bias=None):
            b = self.bias if bias is None else bias
            return x + _broadcast(b, x, x.dim() if b.dim() == 0 else self.axis)
''', deps=("_broadcast",))

helper("PSPBatchNorm", '''
    class PSPBatchNorm(nn.Module):
        """PSPNet's BN at inference: weight * (x - mean) / sqrt(var + eps) + bias."""

        def __init__(self, channels, eps):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
            self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.register_buffer("running_mean", torch.zeros(1, channels, 1, 1))
            self.register_buffer("running_var", torch.ones(1, channels, 1, 1))

        def forward(self, x):
            n, c = x.shape[0], x.shape[1]
            xr = x.reshape(n, c, -1)
            mean = self.running_mean.reshape(1, c, 1)
            inv_std = torch.pow(self.running_var.reshape(1, c, 1) + self.eps, -0.5)
            y = (xr - mean) * inv_std * self.weight.reshape(1, c, 1) + self.bias.reshape(1, c, 1)
            return y.reshape(x.shape)
''')

helper("L2Normalize", '''
    class L2Normalize(nn.Module):
        """SSD's Normalize: x / sqrt(sum(x^2) + eps) * weight, the sum over C*H*W
        (across_spatial) or over C at each position; weight shared (0-d) or per channel."""

        def __init__(self, across_spatial, eps, shape):
            super().__init__()
            self.across_spatial, self.eps = across_spatial, eps
            self.weight = nn.Parameter(torch.ones(shape))

        def forward(self, x):
            n, c = x.shape[0], x.shape[1]
            xr = x.reshape(n, c, -1)
            dims = (1, 2) if self.across_spatial else (1,)
            norm = torch.sqrt((xr * xr).sum(dim=dims, keepdim=True) + self.eps)
            s = self.weight.reshape(1, -1, 1) if self.weight.dim() else self.weight
            return (xr / norm * s).reshape(x.shape)
''')

helper("Embed", '''
    class Embed(nn.Module):
        """Caffe's Embed: float indices truncated to int, weight (input_dim, num_output)."""

        def __init__(self, input_dim, num_output, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(input_dim, num_output))
            self.bias = nn.Parameter(torch.zeros(num_output)) if bias else None

        def forward(self, idx):
            y = F.embedding(idx.long(), self.weight)
            return y + self.bias if self.bias is not None else y
''', imports=("F",))

helper("ArgMax", '''
    class ArgMax(nn.Module):
        """Caffe's ArgMax: top-k indices (or values) along `dim`, or over each item flattened
        (dim None: top (N, 1 or 2, k) padded to the input's axis count, at least 3). Ties: the
        larger index first (Caffe sorts (value, index) pairs descending)."""

        def __init__(self, top_k, out_max_val, dim=None):
            super().__init__()
            self.k, self.out_max_val, self.dim = top_k, out_max_val, dim

        def _topk(self, x, dim):
            n = x.shape[dim]
            vals, ridx = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
            return vals.narrow(dim, 0, self.k), (n - 1) - ridx.narrow(dim, 0, self.k)

        def forward(self, x):
            x = x.detach()
            if self.dim is not None:
                vals, idx = self._topk(x, self.dim)
                return vals if self.out_max_val else idx.to(x.dtype)
            vals, idx = self._topk(x.reshape(x.shape[0], -1), 1)
            if self.out_max_val:
                out = torch.stack([idx.to(x.dtype), vals], dim=1)
            else:
                out = idx.to(x.dtype).unsqueeze(1)
            shape = [1] * max(x.dim(), 3)
            shape[0], shape[1], shape[2] = x.shape[0], out.shape[1], self.k
            return out.reshape(shape)
''')

helper("Tile", '''
    class Tile(nn.Module):
        def __init__(self, dim, tiles):
            super().__init__()
            self.dim, self.tiles = dim, tiles

        def forward(self, x):
            reps = [1] * x.dim()
            reps[self.dim] = self.tiles
            return x.repeat(reps)
''')

helper("Reduction", '''
    class Reduction(nn.Module):
        """Caffe's Reduction: ALL axes from `axis` on reduced ("sum", "asum", "sumsq", "mean"),
        times coeff."""

        def __init__(self, op, axis, coeff):
            super().__init__()
            self.op, self.axis, self.coeff = op, axis, coeff

        def forward(self, x):
            xr = x.reshape(*x.shape[: self.axis], -1)
            if self.op == "asum":
                y = xr.abs().sum(dim=-1)
            elif self.op == "sumsq":
                y = (xr * xr).sum(dim=-1)
            else:
                y = xr.sum(dim=-1)
            coeff = self.coeff / max(xr.shape[-1], 1) if self.op == "mean" else self.coeff
            return y * coeff
''')

helper("MVN", '''
    class MVN(nn.Module):
        """Caffe's MVN: x - mean per item (and channel unless across_channels); with
        normalize_variance divided by std + eps (eps on the std, not the variance)."""

        def __init__(self, normalize_variance, across_channels, eps):
            super().__init__()
            self.normalize_variance, self.across_channels, self.eps = normalize_variance, across_channels, eps

        def forward(self, x):
            rows = x.shape[0] if self.across_channels or x.dim() < 2 else x.shape[0] * x.shape[1]
            xr = x.reshape(rows, -1)
            y = xr - xr.mean(dim=1, keepdim=True)
            if self.normalize_variance:
                y = y / (torch.sqrt((y * y).mean(dim=1, keepdim=True)) + self.eps)
            return y.reshape(x.shape)
''')

helper("BatchReindex", '''
    class BatchReindex(nn.Module):
        def forward(self, x, index):
            return x.index_select(0, index.long())
''')

helper("Filter", '''
    class Filter(nn.Module):
        """Caffe's Filter: the items (axis 0) whose selector (the last input) is non-zero."""

        def forward(self, *xs):
            sel = xs[-1].reshape(xs[-1].shape[0])
            idx = torch.nonzero(sel != 0).reshape(-1)
            out = tuple(x.index_select(0, idx) for x in xs[:-1])
            return out if len(out) > 1 else out[0]
''')

helper("Parameter", '''
    class Parameter(nn.Module):
        """Caffe's Parameter layer: its output is the learned blob."""

        def __init__(self, shape):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(shape))

        def forward(self):
            return self.weight
''')

helper("Constant", '''
    class Constant(nn.Module):
        """A top that depends only on the input shapes (e.g. SSD's PriorBox), computed for the
        net's input size and stored."""

        def __init__(self, shape):
            super().__init__()
            self.register_buffer("value", torch.zeros(shape))

        def forward(self, *inputs):
            return self.value
''')

helper("LSTMUnit", '''
    class LSTMUnit(nn.Module):
        """Caffe's LSTMUnit step: gates i, f, o, g from x's four slices; the forget gate is
        cont * sigmoid(x_f), exactly 0 where cont is 0. Returns (c, h)."""

        def forward(self, c_prev, x, cont):
            xi, xf, xo, xg = torch.chunk(x, 4, dim=-1)
            cont = cont.unsqueeze(-1)
            f = torch.where(cont == 0, torch.zeros_like(xf), cont * torch.sigmoid(xf))
            c = f * c_prev + torch.sigmoid(xi) * torch.tanh(xg)
            return c, torch.sigmoid(xo) * torch.tanh(c)
''')

helper("Interp", '''
    class Interp(nn.Module):
        """DeepLab/PSPNet Interp: crop by pad_beg/pad_end, then bilinear with aligned corners as
        caffe_cpu_interp2 (float32 ratio (in - 1) / (out - 1), index int(ratio * i))."""

        def __init__(self, size, pad_beg, pad_end):
            super().__init__()
            self.size, self.pad_beg, self.pad_end = size, pad_beg, pad_end

        @staticmethod
        def _axis(n_in, n_out, device):
            f32 = torch.float32
            one = torch.ones((), dtype=f32)
            r = (one * (n_in - 1)) / (one * (n_out - 1)) if n_out > 1 else one * 0
            pos = r * torch.arange(n_out, dtype=f32)
            i0 = pos.long()
            i1 = i0 + (i0 < n_in - 1).long()
            lam1 = pos - i0.to(f32)
            return i0.to(device), i1.to(device), (1 - lam1).to(device), lam1.to(device)

        def forward(self, x, *ref):
            he = x.shape[2] + self.pad_beg + self.pad_end
            we = x.shape[3] + self.pad_beg + self.pad_end
            off = -self.pad_beg
            x = x[:, :, off:off + he, off:off + we]
            oh, ow = self.size
            if (he, we) == (oh, ow):
                return x.clone()
            h0, h1, hl0, hl1 = self._axis(he, oh, x.device)
            w0, w1, wl0, wl1 = self._axis(we, ow, x.device)
            r0, r1 = x.index_select(2, h0), x.index_select(2, h1)
            wl0, wl1 = wl0.to(x.dtype).view(1, 1, 1, -1), wl1.to(x.dtype).view(1, 1, 1, -1)
            top = wl0 * r0.index_select(3, w0) + wl1 * r0.index_select(3, w1)
            bot = wl0 * r1.index_select(3, w0) + wl1 * r1.index_select(3, w1)
            return hl0.to(x.dtype).view(1, 1, -1, 1) * top + hl1.to(x.dtype).view(1, 1, -1, 1) * bot
''')

helper("Upsample", '''
    class Upsample(nn.Module):
        """SegNet's Upsample: each value goes to the flat position int(mask) of an out_h x out_w
        plane (the last one where several share it), zeros elsewhere."""

        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, x, mask):
            n, c = x.shape[0], x.shape[1]
            plane = self.size[0] * self.size[1]
            idx = mask.reshape(n, c, -1).long()
            src = torch.arange(idx.shape[-1], device=x.device).expand_as(idx)
            win = torch.full((n, c, plane), -1, dtype=torch.long, device=x.device)
            win = win.scatter_reduce(2, idx, src, "amax")
            got = x.reshape(n, c, -1).gather(2, win.clamp(min=0))
            out = torch.where(win >= 0, got, torch.zeros_like(got))
            return out.reshape(n, c, *self.size)
''')


helper("ROIPool", '''
    class ROIPool(nn.Module):
        """Fast R-CNN ROI max pooling: rois (R, 5) = [batch, x1, y1, x2, y2] scaled by spatial_scale
        and rounded half away from zero; ROI size max(end - start + 1, 1); bin p spans
        [floor(p * bin), ceil((p + 1) * bin)) in float32, clipped to the map; empty bins give 0;
        ties keep the first maximum in row-major order."""

        def __init__(self, pooled_h, pooled_w, spatial_scale):
            super().__init__()
            self.pooled_h, self.pooled_w, self.spatial_scale = pooled_h, pooled_w, spatial_scale

        @staticmethod
        def _bins(start, size, n, limit):
            f32 = torch.float32
            bin_size = size.to(f32) / torch.tensor(float(n), dtype=f32)
            p = torch.arange(n, device=start.device, dtype=f32)
            lo = torch.floor(p[None, :] * bin_size[:, None]).long() + start[:, None]
            hi = torch.ceil((p[None, :] + 1) * bin_size[:, None]).long() + start[:, None]
            return lo.clamp(0, limit), hi.clamp(0, limit)

        def forward(self, x, rois):
            N, C, H, W = x.shape
            PH, PW = self.pooled_h, self.pooled_w
            rois = rois.detach().reshape(-1, 5).to(torch.float32)
            b = rois[:, 0].long()
            scale = torch.tensor(self.spatial_scale, dtype=torch.float32)
            v = rois[:, 1:] * scale
            xs, ys, xe, ye = (torch.sign(v) * torch.floor(v.abs() + 0.5)).long().unbind(1)
            hlo, hhi = self._bins(ys, torch.clamp(ye - ys + 1, min=1), PH, H)
            wlo, whi = self._bins(xs, torch.clamp(xe - xs + 1, min=1), PW, W)
            rows = torch.arange(H, device=x.device)
            cols = torch.arange(W, device=x.device)
            mh = (rows[None, None, :] >= hlo[:, :, None]) & (rows[None, None, :] < hhi[:, :, None])  # R, PH, H
            mw = (cols[None, None, :] >= wlo[:, :, None]) & (cols[None, None, :] < whi[:, :, None])  # R, PW, W
            feat = x[b]  # R, C, H, W
            vw = feat[:, :, :, None, :].masked_fill(~mw[:, None, None], -torch.inf)  # R, C, H, PW, W
            m1 = vw.max(dim=-1).values  # R, C, H, PW
            vh = m1[:, :, None].masked_fill(~mh[:, None, :, :, None], -torch.inf)  # R, C, PH, H, PW
            out = vh.max(dim=3).values  # R, C, PH, PW
            empty = (hhi <= hlo)[:, :, None] | (whi <= wlo)[:, None, :]
            return torch.where(empty[:, None], torch.zeros_like(out), out)
''')


helper("CaffeLSTM", '''
    class CaffeLSTM(nn.Module):
        """Caffe's LSTM over x (T, N, ...) with continuation flags cont (T, N): one bias, gates
        i, f, o, g, cont_t zeroes h_{t-1} and c_{t-1} per stream, an optional static input (N, ...)
        added to every step. Each call starts from zero state, or from h0, c0 (1, N, H) when
        expose_hidden (then also returns hT, cT); Caffe instead carries the last state into the
        next forward when the state is not exposed."""

        def __init__(self, input_dim, hidden, static_dim=None, expose_hidden=False):
            super().__init__()
            self.hidden, self.expose_hidden = hidden, expose_hidden
            self.w_xc = nn.Parameter(torch.zeros(4 * hidden, input_dim))
            self.b_c = nn.Parameter(torch.zeros(4 * hidden))
            self.w_xc_static = nn.Parameter(torch.zeros(4 * hidden, static_dim)) if static_dim else None
            self.w_hc = nn.Parameter(torch.zeros(4 * hidden, hidden))

        def forward(self, x, cont, *rest):
            T, N = x.shape[0], x.shape[1]
            gx = F.linear(x.reshape(T, N, -1), self.w_xc, self.b_c)
            if self.w_xc_static is not None:
                gx = gx + F.linear(rest[0].reshape(N, -1), self.w_xc_static).unsqueeze(0)
                rest = rest[1:]
            if self.expose_hidden:
                h, c = (r.reshape(N, self.hidden) for r in rest)
            else:
                h = c = x.new_zeros(N, self.hidden)
            hs = []
            for t in range(T):
                ct = cont[t].to(x.dtype).unsqueeze(1)
                gates = F.linear(ct * h, self.w_hc) + gx[t]
                xi, xf, xo, xg = gates.chunk(4, dim=-1)
                f = torch.where(ct == 0, torch.zeros_like(xf), ct * torch.sigmoid(xf))
                c = f * c + torch.sigmoid(xi) * torch.tanh(xg)
                h = torch.sigmoid(xo) * torch.tanh(c)
                hs.append(h)
            out = torch.stack(hs)
            if self.expose_hidden:
                return out, h.reshape(1, N, -1), c.reshape(1, N, -1)
            return out
''', imports=("F",))

helper("CaffeRNN", '''
    class CaffeRNN(nn.Module):
        """Caffe's Elman RNN: h_t = tanh(W_hh (cont_t * h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_s]),
        output o_t = tanh(W_ho h_t + b_o) (not h, unlike nn.RNN). State as CaffeLSTM's."""

        def __init__(self, input_dim, hidden, static_dim=None, expose_hidden=False):
            super().__init__()
            self.hidden, self.expose_hidden = hidden, expose_hidden
            self.w_xh = nn.Parameter(torch.zeros(hidden, input_dim))
            self.b_h = nn.Parameter(torch.zeros(hidden))
            self.w_xh_static = nn.Parameter(torch.zeros(hidden, static_dim)) if static_dim else None
            self.w_hh = nn.Parameter(torch.zeros(hidden, hidden))
            self.w_ho = nn.Parameter(torch.zeros(hidden, hidden))
            self.b_o = nn.Parameter(torch.zeros(hidden))

        def forward(self, x, cont, *rest):
            T, N = x.shape[0], x.shape[1]
            hx = F.linear(x.reshape(T, N, -1), self.w_xh, self.b_h)
            if self.w_xh_static is not None:
                hx = hx + F.linear(rest[0].reshape(N, -1), self.w_xh_static).unsqueeze(0)
                rest = rest[1:]
            h = rest[0].reshape(N, self.hidden) if self.expose_hidden else x.new_zeros(N, self.hidden)
            hs = []
            for t in range(T):
                h = torch.tanh(F.linear(cont[t].to(x.dtype).unsqueeze(1) * h, self.w_hh) + hx[t])
                hs.append(h)
            o = torch.tanh(F.linear(torch.stack(hs), self.w_ho, self.b_o))
            return (o, h.reshape(1, N, -1)) if self.expose_hidden else o
''', imports=("F",))


helper("DetectionOutput", '''
    class DetectionOutput(nn.Module):
        """SSD's DetectionOutput (inference only, float32 as the fork's CPU code): boxes decoded
        per code_type (1 CORNER, 2 CENTER_SIZE, 3 CORNER_SIZE; no clipping); per image and
        non-background class ApplyNMSFast (score > confidence_threshold, stable descending sort,
        top_k, keep while overlap <= threshold, eta adaptation); then the best keep_top_k over all
        classes. Output (1, 1, K, 7) rows [image, label, score, xmin, ymin, xmax, ymax] by image,
        label, descending score; no detection at all: one row of -1 per image (column 0 = image)."""

        def __init__(self, num_classes, share_location, background, code_type, variance_encoded,
                     keep_top_k, confidence_threshold, nms_threshold, eta, top_k):
            super().__init__()
            self.num_classes, self.share_location, self.background = num_classes, share_location, background
            self.code_type, self.variance_encoded, self.keep_top_k = code_type, variance_encoded, keep_top_k
            self.conf_threshold, self.nms_threshold, self.eta, self.top_k = (
                confidence_threshold, nms_threshold, eta, top_k)

        def _decode(self, loc, pr, var):
            lx, ly, lw, lh = loc.unbind(-1)
            pxmin, pymin, pxmax, pymax = pr.unbind(-1)
            v0, v1, v2, v3 = var.unbind(-1)
            if self.code_type == 1:
                out = [pxmin + v0 * lx, pymin + v1 * ly, pxmax + v2 * lw, pymax + v3 * lh]
            elif self.code_type == 2:
                pw, ph = pxmax - pxmin, pymax - pymin
                pcx, pcy = (pxmin + pxmax) / 2, (pymin + pymax) / 2
                cx, cy = v0 * lx * pw + pcx, v1 * ly * ph + pcy
                w, h = torch.exp(v2 * lw) * pw, torch.exp(v3 * lh) * ph
                out = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            else:
                pw, ph = pxmax - pxmin, pymax - pymin
                out = [pxmin + v0 * lx * pw, pymin + v1 * ly * ph, pxmax + v2 * lw * pw, pymax + v3 * lh * ph]
            return torch.stack(out, dim=-1)

        @staticmethod
        def _sizes(b):
            bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
            return torch.where(bad, torch.zeros_like(b[:, 0]), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))

        @staticmethod
        def _iou(box, size, others, other_sizes):
            disjoint = ((others[:, 0] > box[2]) | (others[:, 2] < box[0]) |
                        (others[:, 1] > box[3]) | (others[:, 3] < box[1]))
            iw = torch.minimum(box[2], others[:, 2]) - torch.maximum(box[0], others[:, 0])
            ih = torch.minimum(box[3], others[:, 3]) - torch.maximum(box[1], others[:, 1])
            inter = iw * ih
            ok = ~disjoint & (iw > 0) & (ih > 0)
            return torch.where(ok, inter / (size + other_sizes - inter), torch.zeros_like(inter))

        def _nms(self, boxes, sizes, scores):
            f32 = torch.float32
            cand = torch.nonzero(scores > torch.tensor(self.conf_threshold, dtype=f32)).reshape(-1)
            order = cand[torch.sort(scores[cand], descending=True, stable=True).indices]
            if self.top_k > -1:
                order = order[: self.top_k]
            kept = []
            thr = torch.tensor(self.nms_threshold, dtype=f32)
            eta = torch.tensor(self.eta, dtype=f32)
            for idx in order.tolist():
                if kept:
                    k = torch.tensor(kept)
                    if not bool((self._iou(boxes[idx], sizes[idx], boxes[k], sizes[k]) <= thr).all()):
                        continue
                kept.append(idx)
                if self.eta < 1 and thr > 0.5:
                    thr = thr * eta
            return kept

        def forward(self, loc, conf, prior):
            loc, conf, prior = loc.detach().float().cpu(), conf.detach().float().cpu(), prior.detach().float().cpu()
            num = loc.shape[0]
            flat = prior.reshape(-1)
            npri = flat.numel() // 8
            pboxes, pvars = flat[: npri * 4].reshape(npri, 4), flat[npri * 4: npri * 8].reshape(npri, 4)
            if self.variance_encoded:
                pvars = torch.ones_like(pvars)
            n_loc = 1 if self.share_location else self.num_classes
            locs = loc.reshape(num, npri, n_loc, 4)
            confs = conf.reshape(num, npri, self.num_classes)
            results, num_kept = [], 0
            for i in range(num):
                decoded = {}
                for c in range(n_loc):
                    label = -1 if self.share_location else c
                    if label != self.background:
                        b = self._decode(locs[i, :, c], pboxes, pvars)
                        decoded[label] = (b, self._sizes(b))
                indices, num_det = {}, 0
                for c in range(self.num_classes):
                    if c == self.background:
                        continue
                    boxes, sizes = decoded[-1 if self.share_location else c]
                    indices[c] = self._nms(boxes, sizes, confs[i, :, c])
                    num_det += len(indices[c])
                if self.keep_top_k > -1 and num_det > self.keep_top_k:
                    pairs = [(float(confs[i, j, c]), c, j) for c in sorted(indices) for j in indices[c]]
                    best = sorted(range(len(pairs)), key=lambda t: -pairs[t][0])[: self.keep_top_k]
                    indices = {}
                    for t in best:
                        indices.setdefault(pairs[t][1], []).append(pairs[t][2])
                    num_kept += self.keep_top_k
                else:
                    num_kept += num_det
                results.append((indices, decoded))
            if num_kept == 0:
                out = torch.full((num, 7), -1.0)
                out[:, 0] = torch.arange(num, dtype=out.dtype)
                return out.reshape(1, 1, num, 7)
            rows = []
            for i, (indices, decoded) in enumerate(results):
                for c in sorted(indices):
                    boxes = decoded[-1 if self.share_location else c][0]
                    for j in indices[c]:
                        rows.append(torch.cat([torch.tensor([float(i), float(c)]), confs[i, j, c:c + 1], boxes[j]]))
            return torch.stack(rows).reshape(1, 1, -1, 7)
''')


# --------------------------------------------------------------------------------------------------
# per-type source forms
# --------------------------------------------------------------------------------------------------
@dataclass
class PyLayer:
    """What a source form sees of one Caffe layer."""

    layer: Any  # the caffeport Layer
    bottom_shapes: list[tuple[int, ...]]
    top_shapes: list[tuple[int, ...]]
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # computed tops (shape-only layers)

    @property
    def param(self) -> caffe_pb2.LayerParameter:
        return self.layer.param

    @property
    def blobs(self) -> list[torch.Tensor]:
        return [b.detach().cpu().clone() for b in self.layer.blobs]

    def error(self, msg: str) -> NoSourceForm:
        return NoSourceForm(f"layer '{self.param.name}' ({self.param.type}): {msg}")


@dataclass
class Form:
    """A layer's source form: ``module`` is the attribute's constructor expression."""

    module: str | None  # None: no attribute (Split aliases its bottom, Silence does nothing)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    helpers: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    per_bottom: bool = False  # applied to each bottom in turn, one top each (Convolution)
    pre: str | None = None  # a format string applied to bottom 0 first, e.g. "{}.flatten(1)"


SourceForm = Callable[[PyLayer], Form]
SOURCE_FORMS: dict[str, SourceForm] = {}

NO_SOURCE_FORM = {
    "Python": "a Python layer runs arbitrary code",
    "Accuracy": "an evaluation layer, not part of a deploy net",
}


def source_form(*type_names: str) -> Callable[[SourceForm], SourceForm]:
    """Register the source form of one or more Caffe layer types."""

    def deco(fn: SourceForm) -> SourceForm:
        for t in type_names:
            SOURCE_FORMS[t] = fn
        return fn

    return deco


def _lit(v: Any) -> str:
    """A Python literal for a constructor argument."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return f"float({str(v)!r})"
        f32 = float(np.float32(v))
        if f32 == v:  # a float32 proto field: its shortest float32 spelling (1e-4, not 9.9999997e-05)
            return repr(float(np.format_float_positional(np.float32(v), unique=True, trim="0")))
        return repr(v)
    if isinstance(v, tuple):
        inner = ", ".join(_lit(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    if isinstance(v, list):
        return "[" + ", ".join(_lit(x) for x in v) + "]"
    return repr(v)


def _call(name: str, *args: Any, **kwargs: Any) -> str:
    parts = [_lit(a) for a in args] + [f"{k}={_lit(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _one(values: Sequence[int]) -> int | tuple[int, ...]:
    """A per-axis tuple shown as one int when all axes agree."""
    vals = tuple(int(v) for v in values)
    return vals[0] if len(set(vals)) == 1 else vals


@source_form("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution", "Deconvolution")
def _conv(L: PyLayer) -> Form:
    lay = L.layer
    if lay.axis != 1:
        raise L.error(f"convolution over axis {lay.axis} is not generated (only axis 1)")
    w, *rest = L.blobs
    n = w.dim() - 2
    deconv = L.param.type == "Deconvolution"
    c_in = L.bottom_shapes[0][1]
    group = int(lay.group) if deconv else c_in // w.shape[1]
    c_out = w.shape[1] * group if deconv else w.shape[0]
    kw: dict[str, Any] = {"kernel_size": _one(w.shape[2:])}
    if any(s != 1 for s in lay.stride):
        kw["stride"] = _one(lay.stride)
    if any(lay.pad):
        kw["padding"] = _one(lay.pad)
    if any(d != 1 for d in lay.dilation):
        kw["dilation"] = _one(lay.dilation)
    if group != 1:
        kw["groups"] = group
    if not rest:
        kw["bias"] = False
    state = {"weight": w}
    if rest:
        state["bias"] = rest[0].reshape(-1)
    name = f"nn.ConvTranspose{n}d" if deconv else f"nn.Conv{n}d"
    return Form(_call(name, c_in, c_out, **kw), state, per_bottom=True)


@source_form("InnerProduct")
def _inner_product(L: PyLayer) -> Form:
    lay = L.layer
    w, *rest = L.blobs
    w = w.reshape(w.shape[-2:]) if w.dim() > 2 else w
    if lay.transpose:
        w = w.t().contiguous()
    state = {"weight": w}
    if rest:
        state["bias"] = rest[0].reshape(-1)
    kw = {} if rest else {"bias": False}
    nd = len(L.bottom_shapes[0])
    pre = None if lay.axis == nd - 1 else f"{{}}.flatten({lay.axis})"
    return Form(_call("nn.Linear", int(w.shape[1]), int(w.shape[0]), **kw), state, pre=pre)


def _std_pool_ok(lay: Any) -> bool:
    """True when nn.MaxPool2d/AvgPool2d give Caffe's numbers for every input size."""
    (kh, kw), (sh, sw), (ph, pw) = lay.kernel, lay.stride, lay.pad
    if ph > kh // 2 or pw > kw // 2:
        return False
    # torch's ceil mode drops a last window that would start past the input (+ left pad); Caffe
    # does that only when some padding is set, and without padding it can only happen if s > k.
    return not lay.ceil or bool(ph or pw) or (sh <= kh and sw <= kw)


@source_form("Pooling")
def _pooling(L: PyLayer) -> Form:
    lay = L.layer
    method = {_PP.MAX: "max", _PP.AVE: "ave", _PP.STOCHASTIC: "stochastic"}[lay.method]
    if lay.want_mask:
        return Form(_call("CaffePool2d", "max", None if lay.global_pooling else tuple(lay.kernel),
                          tuple(lay.stride), tuple(lay.pad), lay.ceil, True), helpers=("CaffePool2d",))
    if lay.global_pooling and method != "stochastic":
        return Form("nn.AdaptiveMaxPool2d(1)" if method == "max" else "nn.AdaptiveAvgPool2d(1)")
    if method != "stochastic" and _std_pool_ok(lay):
        kw: dict[str, Any] = {}
        if tuple(lay.stride) != tuple(lay.kernel):
            kw["stride"] = _one(lay.stride)
        if any(lay.pad):
            kw["padding"] = _one(lay.pad)
        if lay.ceil:
            kw["ceil_mode"] = True
        name = "nn.MaxPool2d" if method == "max" else "nn.AvgPool2d"
        return Form(_call(name, _one(lay.kernel), **kw))
    kernel = None if lay.global_pooling else tuple(lay.kernel)
    return Form(_call("CaffePool2d", method, kernel, tuple(lay.stride), tuple(lay.pad), lay.ceil),
                helpers=("CaffePool2d",))


@source_form("SPP")
def _spp(L: PyLayer) -> Form:
    method = {_PP.MAX: "max", _PP.AVE: "ave", _PP.STOCHASTIC: "stochastic"}[L.layer.method]
    return Form(_call("SPP", method, int(L.layer.height)), helpers=("SPP",))


@source_form("LRN")
def _lrn(L: PyLayer) -> Form:
    lay = L.layer
    if lay.region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        return Form(_call("nn.LocalResponseNorm", lay.size, alpha=lay.alpha, beta=lay.beta, k=lay.k))
    return Form(_call("LRNWithinChannel", lay.size, lay.alpha, lay.beta), helpers=("LRNWithinChannel",))


@source_form("Crop")
def _crop(L: PyLayer) -> Form:
    return Form(_call("Crop", int(L.layer.axis), tuple(L.layer.offsets)), helpers=("Crop",))


@source_form("Im2col")
def _im2col(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("Im2col", tuple(lay.kernel), tuple(lay.stride), tuple(lay.pad), tuple(lay.dilation),
                      axis=int(lay.axis)), helpers=("Im2col",))


@source_form("ReLU")
def _relu(L: PyLayer) -> Form:
    s = float(L.layer.slope)
    return Form(_call("nn.LeakyReLU", s) if s else "nn.ReLU()")


@source_form("Sigmoid", "TanH", "BNLL", "AbsVal")
def _plain_neuron(L: PyLayer) -> Form:
    t = L.param.type
    if t == "AbsVal":
        return Form("AbsVal()", helpers=("AbsVal",))
    return Form({"Sigmoid": "nn.Sigmoid()", "TanH": "nn.Tanh()", "BNLL": "nn.Softplus()"}[t])


@source_form("ELU")
def _elu(L: PyLayer) -> Form:
    return Form(_call("nn.ELU", float(L.layer.alpha)))


@source_form("Swish")
def _swish(L: PyLayer) -> Form:
    beta = float(L.layer.beta)
    return Form("nn.SiLU()") if beta == 1.0 else Form(_call("Swish", beta), helpers=("Swish",))


@source_form("Threshold")
def _threshold(L: PyLayer) -> Form:
    return Form(_call("Threshold", float(L.layer.threshold)), helpers=("Threshold",))


@source_form("Clip")
def _clip(L: PyLayer) -> Form:
    return Form(_call("nn.Hardtanh", float(L.layer.lo), float(L.layer.hi)))


@source_form("Power")
def _power(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("Power", lay.power, lay.scale, lay.shift), helpers=("Power",))


@source_form("Exp")
def _exp(L: PyLayer) -> Form:
    return Form(_call("Exp", float(L.layer.inner), float(L.layer.outer)), helpers=("Exp",))


@source_form("Log")
def _log(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("Log", lay.scale, lay.shift, float(lay.base_scale)), helpers=("Log",))


@source_form("Dropout")
def _dropout(L: PyLayer) -> Form:
    """nn.Dropout: the identity in eval mode (Caffe's TEST), inverted dropout in training."""
    lay = L.layer
    if lay.scale_train:
        return Form(_call("nn.Dropout", float(lay.p)))
    return Form(_call("DropoutScaleAtTest", float(lay.p)), helpers=("DropoutScaleAtTest",))


@source_form("PReLU")
def _prelu(L: PyLayer) -> Form:
    w = L.blobs[0].reshape(-1)
    return Form(_call("nn.PReLU", int(w.numel())), {"weight": w})


@source_form("Softmax")
def _softmax(L: PyLayer) -> Form:
    return Form(_call("nn.Softmax", dim=int(L.layer.axis)))


@source_form("Concat")
def _concat(L: PyLayer) -> Form:
    return Form(_call("Concat", int(L.layer.axis)), helpers=("Concat",))


@source_form("Slice")
def _slice(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("Slice", int(lay.axis), list(lay.points), int(lay.n_top)), helpers=("Slice",))


@source_form("Eltwise")
def _eltwise(L: PyLayer) -> Form:
    E = caffe_pb2.EltwiseParameter
    op = {E.SUM: "sum", E.PROD: "prod", E.MAX: "max"}[L.layer.op]
    coeffs = [float(c) for c in L.layer.coeff]
    if op != "sum" or all(c == 1.0 for c in coeffs):
        return Form(_call("Eltwise", op), helpers=("Eltwise",))
    return Form(_call("Eltwise", op, coeffs), helpers=("Eltwise",))


@source_form("Flatten")
def _flatten(L: PyLayer) -> Form:
    fp = L.param.flatten_param
    nd = len(L.bottom_shapes[0])
    a, e = int(fp.axis), int(fp.end_axis)
    a, e = a + nd if a < 0 else a, e + nd if e < 0 else e
    return Form(_call("nn.Flatten", a, e))


@source_form("Reshape")
def _reshape(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("Reshape", list(lay.dims), lay._axis, lay._num_axes), helpers=("Reshape",))


@source_form("Split")
def _split(L: PyLayer) -> Form:
    return Form(None)


@source_form("Silence")
def _silence(L: PyLayer) -> Form:
    return Form(None)


@source_form("Permute")
def _permute(L: PyLayer) -> Form:
    return Form(_call("Permute", tuple(L.layer.order)), helpers=("Permute",))


@source_form("ShuffleChannel")
def _shuffle(L: PyLayer) -> Form:
    return Form(_call("nn.ChannelShuffle", int(L.layer.group)))


def _scalar_axis(L: PyLayer, axis_param: int) -> int:
    nd = len(L.bottom_shapes[0])
    return axis_param + nd if axis_param < 0 else axis_param


@source_form("Scale")
def _scale(L: PyLayer) -> Form:
    lay = L.layer
    blobs = L.blobs
    axis = _scalar_axis(L, lay._axis_param)
    state: dict[str, torch.Tensor] = {}
    kw: dict[str, Any] = {}
    if len(L.bottom_shapes) == 1:
        state["weight"] = blobs[0]
        kw["shape"] = tuple(blobs[0].shape)
    if lay.bias_term:
        state["bias"] = blobs[-1]
        kw["bias_shape"] = tuple(blobs[-1].shape)
    return Form(_call("Scale", axis, **kw), state, helpers=("Scale",))


@source_form("Bias")
def _bias(L: PyLayer) -> Form:
    axis = _scalar_axis(L, L.layer._axis_param)
    if len(L.bottom_shapes) > 1:
        return Form(_call("Bias", axis), helpers=("Bias",))
    b = L.blobs[0]
    return Form(_call("Bias", axis, tuple(b.shape)), {"bias": b}, helpers=("Bias",))


@source_form("BatchNorm")
def _batch_norm(L: PyLayer) -> Form:
    """nn.BatchNorm{1,2,3}d without affine part; Caffe's stored sums divided by the scale factor
    (0 when it is 0). use_global_stats false at TEST: batch statistics (track_running_stats off)."""
    lay = L.layer
    nd = len(L.bottom_shapes[0])
    kind = {2: 1, 3: 1, 4: 2, 5: 3}.get(nd)
    if kind is None:
        raise L.error(f"a {nd}-axis bottom has no nn.BatchNorm form")
    C = int(lay.channels)
    if not lay.use_global_stats:
        return Form(_call(f"nn.BatchNorm{kind}d", C, eps=lay.eps, affine=False, track_running_stats=False))
    mean, var, factor = L.blobs[:3]
    f = float(factor.reshape(-1)[0])
    inv = 0.0 if f == 0 else 1.0 / f
    state = {"running_mean": mean.reshape(-1) * inv, "running_var": var.reshape(-1) * inv,
             "num_batches_tracked": torch.tensor(0, dtype=torch.long)}
    return Form(_call(f"nn.BatchNorm{kind}d", C, eps=lay.eps, affine=False), state)


@source_form("BN")
def _bn(L: PyLayer) -> Form:
    slope, bias, mean, var = L.blobs[:4]
    state = {"weight": slope, "bias": bias, "running_mean": mean, "running_var": var}
    return Form(_call("PSPBatchNorm", int(L.layer.channels), float(L.layer.eps)), state, helpers=("PSPBatchNorm",))


@source_form("Normalize")
def _normalize(L: PyLayer) -> Form:
    w = L.blobs[0]
    lay = L.layer
    return Form(_call("L2Normalize", lay.across_spatial, lay.eps, tuple(w.shape)), {"weight": w},
                helpers=("L2Normalize",))


@source_form("Embed")
def _embed(L: PyLayer) -> Form:
    lay = L.layer
    blobs = L.blobs
    state = {"weight": blobs[0]}
    if lay.bias_term:
        state["bias"] = blobs[1].reshape(-1)
    return Form(_call("Embed", lay.input_dim, lay.num_output, lay.bias_term), state, helpers=("Embed",))


@source_form("ArgMax")
def _argmax(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("ArgMax", lay.top_k, lay.out_max_val, lay.axis), helpers=("ArgMax",))


@source_form("Tile")
def _tile(L: PyLayer) -> Form:
    return Form(_call("Tile", int(L.layer.axis), int(L.layer.tiles)), helpers=("Tile",))


@source_form("Reduction")
def _reduction(L: PyLayer) -> Form:
    R = caffe_pb2.ReductionParameter
    op = {R.SUM: "sum", R.ASUM: "asum", R.SUMSQ: "sumsq", R.MEAN: "mean"}[L.layer.op]
    return Form(_call("Reduction", op, int(L.layer.axis), float(L.layer.coeff)), helpers=("Reduction",))


@source_form("MVN")
def _mvn(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("MVN", lay.normalize_variance, lay.across_channels, lay.eps), helpers=("MVN",))


@source_form("BatchReindex")
def _batch_reindex(L: PyLayer) -> Form:
    return Form("BatchReindex()", helpers=("BatchReindex",))


@source_form("Filter")
def _filter(L: PyLayer) -> Form:
    return Form("Filter()", helpers=("Filter",))


@source_form("Parameter")
def _parameter(L: PyLayer) -> Form:
    w = L.blobs[0]
    return Form(_call("Parameter", tuple(w.shape)), {"weight": w}, helpers=("Parameter",))


@source_form("LSTMUnit")
def _lstm_unit(L: PyLayer) -> Form:
    return Form("LSTMUnit()", helpers=("LSTMUnit",))


@source_form("Interp")
def _interp(L: PyLayer) -> Form:
    lay = L.layer
    size = tuple(int(d) for d in L.top_shapes[0][2:])
    return Form(_call("Interp", size, lay.pad_beg, lay.pad_end), helpers=("Interp",))


@source_form("Upsample")
def _upsample(L: PyLayer) -> Form:
    size = tuple(int(d) for d in L.top_shapes[0][2:])
    return Form(_call("Upsample", size), helpers=("Upsample",))


@source_form("ROIPooling")
def _roi_pooling(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("ROIPool", lay.pooled_h, lay.pooled_w, float(lay.spatial_scale)), helpers=("ROIPool",))


@source_form("LSTM", "RNN")
def _recurrent(L: PyLayer) -> Form:
    """Caffe's unrolled recurrent net as one loop; each call starts from zero state (see CaffeLSTM)."""
    lay = L.layer
    blobs = L.blobs
    lstm = L.param.type == "LSTM"
    names = ["w_xc", "b_c"] if lstm else ["w_xh", "b_h"]
    if lay.static_input:
        names.append("w_xc_static" if lstm else "w_xh_static")
    names += ["w_hc"] if lstm else ["w_hh", "w_ho", "b_o"]
    state = dict(zip(names, blobs))
    static_dim = int(blobs[2].shape[1]) if lay.static_input else None
    kw: dict[str, Any] = {}
    if static_dim:
        kw["static_dim"] = static_dim
    if lay.expose_hidden:
        kw["expose_hidden"] = True
    cls = "CaffeLSTM" if lstm else "CaffeRNN"
    return Form(_call(cls, int(blobs[0].shape[1]), int(lay.hidden), **kw), state, helpers=(cls,))


@source_form("DetectionOutput")
def _detection_output(L: PyLayer) -> Form:
    lay = L.layer
    return Form(_call("DetectionOutput", lay.num_classes, lay.share_location, lay.background, lay.code_type,
                      lay.variance_encoded, lay.keep_top_k, float(lay.conf_threshold), float(lay.nms_threshold),
                      float(lay.eta), lay.top_k), helpers=("DetectionOutput",))


SHAPE_ONLY = {"PriorBox"}


@source_form("PriorBox")
def _shape_only(L: PyLayer) -> Form:
    """The top depends only on the bottoms' shapes: stored as a buffer for the net's input size."""
    value = L.values.get(0)
    if value is None:
        raise L.error("no computed value to embed")
    return Form(_call("Constant", tuple(value.shape)), {"value": value}, helpers=("Constant",))


# --------------------------------------------------------------------------------------------------
# the whole net
# --------------------------------------------------------------------------------------------------
_RESERVED = {"self", "torch", "nn", "F", "math", "Path", "Net", "load", "CAFFE_LAYERS", "INPUTS", "OUTPUTS",
             "caffe_pool2d", "_broadcast"} | set(HELPERS)


class _Names:
    """Unique, valid Python identifiers for Caffe names."""

    def __init__(self, reserved: set[str], attribute: bool = False):
        self.used = set(reserved)
        self.attribute = attribute
        self.map: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name in self.map:
            return self.map[name]
        ident = re.sub(r"\W", "_", name) or "_"
        if ident[0].isdigit():
            ident = "_" + ident
        if self.attribute and ident.startswith("_"):
            ident = "layer" + ident
        if keyword.iskeyword(ident) or (self.attribute and (hasattr(torch.nn.Module, ident) or ident == "training")):
            ident += "_"
        base, i = ident, 1
        while ident in self.used:
            i += 1
            ident = f"{base}_{i}"
        self.used.add(ident)
        self.map[name] = ident
        return ident


def unsupported_layers(net: Any) -> list[str]:
    """'name (Type)' for every layer of ``net`` with no source form."""
    return layers_without_form(net, SOURCE_FORMS)


@dataclass
class GeneratedSource:
    """The generated module text and its state_dict (keys of the generated ``Net``)."""

    source: str
    state_dict: dict[str, torch.Tensor]
    layer_names: dict[str, str]  # attribute -> Caffe layer name
    inputs: list[str]
    outputs: list[str]


def _shape_only_values(net: Any) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        table = net.module.run({n: torch.zeros(net._shapes[n]) for n in net.inputs})
    return {t: table[t].detach().cpu().clone() for p in net._plans if p.layer.param.type in SHAPE_ONLY
            for t in p.tops}


def generate_source(net: Any, *, weights_name: str = "", note: str = "") -> GeneratedSource:
    """The PyTorch source of a deploy ``Net`` (Input layers, no data/loss layers); ``note`` is one
    more line for the module docstring (e.g. what the graph passes did)."""
    bad = unsupported_layers(net)
    if bad:
        types_ = sorted({b.rsplit("(", 1)[1].rstrip(")") for b in bad})
        raise NoSourceForm(
            f"{net.source}: these layers have no plain-PyTorch form: {', '.join(bad)}"
            + "".join(f"; {t}: {NO_SOURCE_FORM[t]}" for t in types_ if t in NO_SOURCE_FORM)
            + (" (derive a deploy net first: caffeport deploy)" if any(
                lay.is_data or lay.is_loss for lay in net.layers) else ""))
    attrs = _Names(set(), attribute=True)
    variables = _Names(_RESERVED)
    shapes = net._shapes
    values = _shape_only_values(net) if any(p.layer.param.type in SHAPE_ONLY for p in net._plans) else {}
    inputs = list(net.inputs)
    current: dict[str, str] = {n: variables(n) for n in inputs}
    init_lines: list[str] = []
    fwd_lines: list[str] = []
    used_helpers: list[str] = []
    imports: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    layer_names: dict[str, str] = {}
    for p in net._plans:
        layer = p.layer
        if layer.is_input:
            continue
        L = PyLayer(layer, [tuple(shapes[b]) for b in p.bottoms], [tuple(shapes[t]) for t in p.tops],
                    {j: values[t] for j, t in enumerate(p.tops) if t in values})
        try:
            form = SOURCE_FORMS[layer.param.type](L)
        except CaffeportError as e:
            raise type(e)(f"{net.source}: {e}") from None
        ins = [current[b] for b in p.bottoms]
        if form.module is None:
            if layer.param.type == "Split":
                for t in p.tops:
                    current[t] = ins[0]
            elif ins:  # Silence: the blob is consumed, nothing computed
                fwd_lines.append(f"_ = {', '.join(ins)}  # {layer.param.type} '{layer.name}'")
            continue
        attr = attrs(layer.name)
        layer_names[attr] = layer.name
        init_lines.append(f"self.{attr} = {form.module}")
        for k, v in form.state.items():
            state[f"{attr}.{k}"] = v
        for h in form.helpers:
            _add_helper(h, used_helpers, imports)
        imports.update(form.imports)
        if form.pre and ins:
            ins = [form.pre.format(ins[0]), *ins[1:]]
        outs = [variables(t) for t in p.tops]
        comment = f"  # {layer.param.type}" + (f" '{layer.name}'" if layer.name != attr else "")
        if form.per_bottom:
            for b, o in zip(ins, outs):
                fwd_lines += _statement(o, f"self.{attr}", [b], comment)
        else:
            fwd_lines += _statement(", ".join(outs) if outs else "_", f"self.{attr}", ins, comment)
        for t, o in zip(p.tops, outs):
            current[t] = o
    outputs = list(net.outputs)
    src = _render(net, inputs, outputs, current, init_lines, fwd_lines, used_helpers, imports, layer_names,
                  weights_name, note)
    return GeneratedSource(src, state, layer_names, inputs, outputs)


def _statement(lhs: str, fn: str, args: list[str], comment: str) -> list[str]:
    """``lhs = fn(args)  # comment``, one argument per line when long."""
    line = f"{lhs} = {fn}({', '.join(args)})"
    if len(line + comment) <= 110:
        return [line + comment]
    head = [f"#{comment[3:]}"]
    if len(line) <= 110 or len(args) < 2:
        return [*head, line]
    return [*head, f"{lhs} = {fn}(", *[f"    {a}," for a in args], ")"]


def _add_helper(name: str, used: list[str], imports: set[str]) -> None:
    if name in used:
        return
    h = HELPERS[name]
    for d in h.deps:
        _add_helper(d, used, imports)
    imports.update(h.imports)
    used.append(name)


def _render(net: Any, inputs: list[str], outputs: list[str], current: dict[str, str], init_lines: list[str],
            fwd_lines: list[str], helpers: list[str], imports: set[str], layer_names: dict[str, str],
            weights_name: str, note: str = "") -> str:
    shapes = net._shapes
    name = (net.net_param.name or "net").replace("\\", "/").replace('"' * 3, "'" * 3)
    if len(name) > 100:
        name = name[:97] + "..."
    head = ['"""PyTorch module of a Caffe net, generated by caffeport.', "",
            f"Net: {name}", f"From: {Path(net.source).name[:100]}",
            *textwrap.wrap(note.replace('"' * 3, "'" * 3).replace("\\", "/"), 100), "",
            "    import <this module>; m = load()       # eval mode, weights from the .pt next to this file",
            "    outputs = m(" + ", ".join(f"{current[n]}=x" for n in inputs[:1]) + ")          # {Caffe blob: tensor}",
            "",
            "Only torch and the standard library are needed. CAFFE_LAYERS maps attributes to Caffe layer",
            "names.",
            '"""', ""]
    lines = head
    if "math" in imports:
        lines.append("import math")
    lines.append("from pathlib import Path")
    lines.append("")
    lines.append("import torch")
    if "F" in imports:
        lines.append("import torch.nn.functional as F")
    lines.append("from torch import nn")
    lines += ["", f"INPUTS = {_dict_lit({n: tuple(shapes[n]) for n in inputs})}",
              f"OUTPUTS = {outputs!r}",
              f"CAFFE_LAYERS = {_dict_lit(layer_names)}", ""]
    for h in helpers:
        lines += ["", HELPERS[h].source, ""]
    lines += ["", "class Net(nn.Module):",
              '    """One attribute per Caffe layer; forward returns {output blob: tensor}."""', "",
              "    def __init__(self):", "        super().__init__()"]
    lines += [f"        {ln}" for ln in init_lines] or ["        pass"]
    args = ", ".join(f"{current[n]}: torch.Tensor" for n in inputs)
    lines += ["", f"    def forward(self{', ' if args else ''}{args}) -> dict[str, torch.Tensor]:"]
    lines += [f"        {ln}" for ln in fwd_lines]
    ret = ", ".join(f"{o!r}: {current[o]}" for o in outputs)
    lines += [f"        return {{{ret}}}", "", ""]
    default = repr(weights_name) if weights_name else "Path(__file__).with_suffix('.pt').name"
    lines += ["def load(path=None, map_location='cpu') -> Net:",
              '    """The module in eval mode with its weights (torch.load(..., weights_only=True))."""',
              "    model = Net()",
              f"    path = Path(path) if path is not None else Path(__file__).with_name({default})",
              "    model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))",
              "    return model.eval()", ""]
    return "\n".join(lines)


def _dict_lit(d: dict) -> str:
    if not d:
        return "{}"
    items = [f"    {k!r}: {_lit(v)}," for k, v in d.items()]
    return "{\n" + "\n".join(items) + "\n}"


def load_generated(source: str, module_name: str = "caffeport_generated") -> types.ModuleType:
    """Execute generated source as a fresh module (for the check; users import the file)."""
    mod = types.ModuleType(module_name)
    mod.__file__ = f"<{module_name}>"
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - our own generated text
    return mod


def check_generated(gen: GeneratedSource, net: Any, *, seed: int = 0, tol: float = 1e-5,
                    feeds: dict[str, Any] | None = None) -> float:
    """Build the generated module, load its state_dict strictly, compare with caffeport's forward on
    ``feeds`` (default: random normal inputs); returns the max relative error (raises
    CaffeportError above ``tol``)."""
    return _checked_model(gen, net, seed=seed, tol=tol, feeds=feeds)[0]


def _checked_model(gen: GeneratedSource, net: Any, *, seed: int, tol: float,
                   feeds: dict[str, Any] | None) -> tuple[float, torch.nn.Module]:
    from caffeport.export.onnx import rel_error

    mod = load_generated(gen.source)
    model = mod.Net()
    try:
        model.load_state_dict(gen.state_dict, strict=True)
    except RuntimeError as e:
        raise CaffeportError(f"{net.source}: generated module does not take its weights: {e}") from None
    model.eval()
    g = torch.Generator().manual_seed(seed)
    if feeds is None:
        feeds = {n: torch.randn(net._shapes[n], generator=g) for n in net.inputs}
    else:
        feeds = {n: torch.as_tensor(feeds[n]) for n in net.inputs}
    with torch.no_grad():
        want = net.module.run(dict(feeds))
        got = model(*[feeds[n] for n in gen.inputs])
    worst = 0.0
    for name in net.outputs:
        err = rel_error(got[name].detach().numpy(), want[name].detach().numpy())
        if not err <= tol:
            raise CaffeportError(f"{net.source}: generated module output '{name}' differs from caffeport's "
                                 f"forward: max relative error {err:.3g} > {tol:g}")
        worst = max(worst, err)
    return worst, model


# Largest max-relative error accepted between an optimized module and the exact net: folding changes
# fp32 rounding (W' = a W summed in a different order), as in fast mode and export-onnx --optimize.
OPTIMIZE_TOL = 1e-4


class PythonExport(NamedTuple):
    """What :func:`export_python` wrote and checked (``report``: the graph passes' report, or None)."""

    py: Path
    pt: Path
    error: float
    report: Any = None


def export_python(net: Any, path: PathLike, *, tol: float = 1e-5, feeds: dict[str, Any] | None = None,
                  optimize: bool = False) -> PythonExport:
    """Write ``path`` (the generated module) and its state_dict next to it (``.pt``), after checking
    the module against caffeport's forward of ``net`` (on ``feeds``, default random inputs).

    ``optimize``: generate the source of the net after the graph passes (:func:`caffeport.passes.
    optimize_net`: BatchNorm/Scale/Bias/Power folded into the preceding conv/fc, TEST Dropout
    dropped), still checked against the exact ``net``, within ``max(tol, OPTIMIZE_TOL)`` (folding
    changes fp32 rounding, so the folded module is not bit-for-bit Caffe's)."""
    from caffeport.io.atomic import atomic_path, atomic_write

    py = Path(path)
    if py.suffix != ".py":
        raise CaffeportError(f"{py}: --python writes a Python module: give a .py output path")
    if not py.stem.isidentifier() or keyword.iskeyword(py.stem):
        raise CaffeportError(f"{py}: the file name must be an importable module name (e.g. mynet.py)")
    pt = py.with_suffix(".pt")
    source_net, report, note = net, None, ""
    if optimize:
        from caffeport.passes import optimize_net

        if net.phase != caffe_pb2.TEST:
            raise CaffeportError(f"{net.source}: --optimize folds TEST-phase layers: give a TEST (deploy) net")
        source_net, report = optimize_net(net)
        source_net.source = net.source
        note = f"Optimized (caffeport.passes): {report.summary()}."
        tol = max(tol, OPTIMIZE_TOL)
    gen = generate_source(source_net, weights_name=pt.name, note=note)
    err, model = _checked_model(gen, net, seed=0, tol=tol, feeds=feeds)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(pt) as tmp:
        torch.save(sd, tmp)
    atomic_write(py, gen.source.encode())
    return PythonExport(py, pt, err, report)
