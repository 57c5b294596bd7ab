"""Vision layers: Convolution, Deconvolution, Pooling, LRN, Im2col, SPP, Crop.

Geometry (output sizes, padding, divisors, tie-breaking) follows BVLC Caffe's CPU code; the heavy
lifting is done by PyTorch's native ops wherever their semantics coincide with Caffe's, and by an
explicit pad + plain window op where they do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from caffeport.layers.base import Layer, Shape, register, run_function
from caffeport.proto import caffe_pb2

FLT_MAX = 3.4028234663852886e38
FLT_MIN = 1.1754943508222875e-38

_PP = caffe_pb2.PoolingParameter
_LRN = caffe_pb2.LRNParameter


def _canonical_axis(layer: Layer, axis: int, num_axes: int, what: str = "axis") -> int:
    if not -num_axes <= axis < num_axes:
        raise layer.error(f"{what} {axis} is out of range for a blob with {num_axes} axes")
    return axis + num_axes if axis < 0 else axis


# --------------------------------------------------------------------------------------------------
# Convolution geometry (BaseConvolutionLayer::LayerSetUp, shared with Im2col)
# --------------------------------------------------------------------------------------------------
def _spatial_values(layer: Layer, cp, name: str, n: int, default: int | None,
                    h_name: str, w_name: str) -> tuple[int, ...]:
    """One value per spatial axis from ``name`` (repeated: 0, 1 or n values) or ``*_h``/``*_w``."""
    rep = list(getattr(cp, name))
    has_hw = cp.HasField(h_name) or cp.HasField(w_name)
    if has_hw:
        if n != 2:
            raise layer.error(f"{h_name} & {w_name} can only be used for 2D convolution ({n} spatial axes)")
        if rep:
            raise layer.error(f"either {name} or {h_name}/{w_name} should be specified; not both")
        return (int(getattr(cp, h_name)), int(getattr(cp, w_name)))
    if not rep:
        if default is None:
            raise layer.error(f"{name} must be specified (once, or once per spatial dimension)")
        return (default,) * n
    if len(rep) not in (1, n):
        raise layer.error(
            f"{name} must be specified once, or once per spatial dimension ({name} specified "
            f"{len(rep)} times; {n} spatial dims)"
        )
    return tuple(int(rep[0 if len(rep) == 1 else i]) for i in range(n))


def _conv_geometry(layer: Layer, cp, n: int) -> tuple[tuple[int, ...], ...]:
    kernel = _spatial_values(layer, cp, "kernel_size", n, None, "kernel_h", "kernel_w")
    if any(k <= 0 for k in kernel):
        raise layer.error(f"filter dimensions must be nonzero (kernel {kernel})")
    stride = _spatial_values(layer, cp, "stride", n, 1, "stride_h", "stride_w")
    if any(s <= 0 for s in stride):
        raise layer.error(f"stride dimensions must be nonzero (stride {stride})")
    pad = _spatial_values(layer, cp, "pad", n, 0, "pad_h", "pad_w")
    dil = list(cp.dilation)
    if len(dil) not in (0, 1, n):
        raise layer.error(
            f"dilation must be specified once, or once per spatial dimension (dilation specified "
            f"{len(dil)} times; {n} spatial dims)"
        )
    dilation = tuple(1 if not dil else int(dil[0 if len(dil) == 1 else i]) for i in range(n))
    if any(d <= 0 for d in dilation):
        raise layer.error(f"dilation must be positive (dilation {dilation})")
    return kernel, stride, pad, dilation


def _conv_out(layer: Layer, size: Sequence[int], kernel, stride, pad, dilation) -> tuple[int, ...]:
    out = []
    for i, d in enumerate(size):
        ext = dilation[i] * (kernel[i] - 1) + 1
        if d + 2 * pad[i] < ext:
            raise layer.error(
                f"spatial axis {i}: input size {d} + 2*pad {pad[i]} is smaller than the (dilated) kernel {ext}"
            )
        out.append((d + 2 * pad[i] - ext) // stride[i] + 1)
    return tuple(out)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvBase(Layer):
    min_bottoms = 1
    min_tops = 1
    reverse = False  # Deconvolution

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if len(self.param.top) != len(bottom_shapes):
            raise self.error(f"needs one top per bottom ({len(bottom_shapes)} bottoms, {len(self.param.top)} tops)")
        shape = bottom_shapes[0]
        for s in bottom_shapes[1:]:
            if s != shape:
                raise self.error(f"all inputs must have the same shape ({shape} vs {s})")
        cp = self.param.convolution_param
        self.axis = _canonical_axis(self, cp.axis, len(shape))
        self.n_spatial = len(shape) - self.axis - 1
        if self.n_spatial not in _CONV_FN:
            raise self.error(f"{self.n_spatial} spatial axes: caffeport supports 1-D, 2-D and 3-D (de)convolution")
        self.kernel, self.stride, self.pad, self.dilation = _conv_geometry(self, cp, self.n_spatial)
        self.channels = shape[self.axis]
        self.num_output = int(cp.num_output)
        if self.num_output <= 0:
            raise self.error("num_output must be > 0")
        self.group = int(cp.group)
        if self.group <= 0 or self.channels % self.group:
            raise self.error(f"channels ({self.channels}) must be a multiple of group ({self.group})")
        if self.num_output % self.group:
            raise self.error(f"num_output ({self.num_output}) must be a multiple of group ({self.group})")
        if self.reverse:
            wshape = (self.channels, self.num_output // self.group, *self.kernel)
        else:
            wshape = (self.num_output, self.channels // self.group, *self.kernel)
        self.bias_term = bool(cp.bias_term)
        self.add_blob(wshape, cp.weight_filler)
        if self.bias_term:
            self.add_blob((self.num_output,), cp.bias_filler)
        self.out_spatial(shape[self.axis + 1:])  # validates the sizes

    def out_spatial(self, size: Sequence[int]) -> tuple[int, ...]:
        raise NotImplementedError

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        out = []
        for s in bottom_shapes:
            out.append((*s[: self.axis], self.num_output, *self.out_spatial(s[self.axis + 1:])))
        return out

    def _conv_one(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: self.axis]
        if self.axis != 1:
            x = x.reshape(-1, *x.shape[self.axis:])
        bias = self.blobs[1] if self.bias_term else None
        if 0 in tuple(x.shape[1:]):  # a 0 channel/spatial axis (not the batch, which may be symbolic):
            shape = (x.shape[0], self.num_output, *self.out_spatial(tuple(int(d) for d in x.shape[2:])))
            y = x.new_zeros(shape)  # torch returns the empty input; Caffe's GEMM sums nothing -> the bias
            if bias is not None:
                y = y + bias.reshape(1, -1, *([1] * (y.dim() - 2)))
        else:
            y = self.op(x, self.blobs[0], bias)
        if self.axis != 1:
            y = y.reshape(*lead, *y.shape[1:])
        return y

    def forward(self, *bottoms: torch.Tensor):
        outs = tuple(self._conv_one(b) for b in bottoms)
        return outs[0] if len(outs) == 1 else outs


@register("Convolution")
class Convolution(_ConvBase):
    """Caffe convolution: weight (num_output, C/group, *k); output size uses floor division.

    Differences from ``nn.Conv2d``: per-axis geometry may come from repeated fields (one value
    broadcast to all axes) or ``*_h``/``*_w``; ``axis`` may put leading batch-like dims before the
    channels (they are flattened into the batch); several bottoms share one set of weights, one top each.
    """

    def out_spatial(self, size: Sequence[int]) -> tuple[int, ...]:
        return _conv_out(self, size, self.kernel, self.stride, self.pad, self.dilation)

    def op(self, x, w, b):
        return _CONV_FN[self.n_spatial](x, w, b, self.stride, self.pad, self.dilation, self.group)


@register("Deconvolution")
class Deconvolution(_ConvBase):
    """Caffe deconvolution = the backward of convolution (PyTorch ``conv_transpose``).

    Weight layout (C_in, num_output/group, *k) is PyTorch's ConvTranspose layout; output size
    s*(in-1) + dil*(k-1) + 1 - 2p, never any output_padding.
    """

    reverse = True

    def out_spatial(self, size: Sequence[int]) -> tuple[int, ...]:
        out = []
        for i, d in enumerate(size):
            o = self.stride[i] * (d - 1) + self.dilation[i] * (self.kernel[i] - 1) + 1 - 2 * self.pad[i]
            if o <= 0:
                raise self.error(f"spatial axis {i}: output size {o} <= 0 (input {d}, pad {self.pad[i]})")
            out.append(o)
        return tuple(out)

    def op(self, x, w, b):
        return _DECONV_FN[self.n_spatial](x, w, b, self.stride, self.pad, 0, self.group, self.dilation)


# --------------------------------------------------------------------------------------------------
# Im2col
# --------------------------------------------------------------------------------------------------
@register("Im2col")
class Im2col(Layer):
    """Caffe's im2col as a layer: top (N, C*prod(k), *out) with channel-major rows (c, k1, k2, ...).

    Same ordering as ``F.unfold`` but N-D, with the output spatial axes kept instead of flattened.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shape = bottom_shapes[0]
        cp = self.param.convolution_param
        self.axis = _canonical_axis(self, cp.axis, len(shape))
        self.n_spatial = len(shape) - self.axis - 1
        if self.n_spatial < 1:
            raise self.error("needs at least one spatial axis after the channel axis")
        self.kernel, self.stride, self.pad, self.dilation = _conv_geometry(self, cp, self.n_spatial)
        _conv_out(self, shape[self.axis + 1:], self.kernel, self.stride, self.pad, self.dilation)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        out = _conv_out(self, s[self.axis + 1:], self.kernel, self.stride, self.pad, self.dilation)
        return [(*s[: self.axis], s[self.axis] * math.prod(self.kernel), *out)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: self.axis + 1]
        n = self.n_spatial
        x = x.reshape(-1, *x.shape[self.axis + 1:])  # (num*C, *spatial)
        pads: list[int] = []
        for p in reversed(self.pad):
            pads += [p, p]
        if any(self.pad):
            x = F.pad(x, pads)
        for i in range(n):
            ext = self.dilation[i] * (self.kernel[i] - 1) + 1
            x = x.unfold(1 + i, ext, self.stride[i])
            if self.dilation[i] > 1:
                x = x[..., :: self.dilation[i]]
        # x: (num*C, o1..on, k1..kn) -> (num*C, k1..kn, o1..on)
        perm = [0, *range(1 + n, 1 + 2 * n), *range(1, 1 + n)]
        x = x.permute(perm)
        out = x.shape[1 + n:]
        return x.reshape(*lead[:-1], lead[-1] * math.prod(self.kernel), *out)


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------
def _pooled_size(size: int, k: int, s: int, p: int, ceil: bool, clip: bool) -> int:
    num = size + 2 * p - k
    out = (-(-num // s) if ceil else num // s) + 1
    if clip and (out - 1) * s >= size + p:
        out -= 1
    return out


def _torch_pooled_size(size: int, k: int, s: int, p: int, ceil: bool) -> int:
    num = size + 2 * p - k
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool2d(
    x: torch.Tensor,
    method: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    ceil: bool = True,
    want_mask: bool = False,
    train: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Caffe's PoolingLayer forward on a (N, C, H, W) tensor: (top, MAX mask or None)."""
    H, W = x.shape[-2], x.shape[-1]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    clip = bool(ph or pw)  # Caffe clips the last window only when some padding is set
    oh = _pooled_size(H, kh, sh, ph, ceil, clip)
    ow = _pooled_size(W, kw, sw, pw, ceil, clip)
    torch_ok = (
        ph <= kh // 2 and pw <= kw // 2 and H + 2 * ph >= kh and W + 2 * pw >= kw
        and _torch_pooled_size(H, kh, sh, ph, ceil) == oh and _torch_pooled_size(W, kw, sw, pw, ceil) == ow
    )
    # A stride reaching past the padded image leaves every later window empty, whatever its size: the
    # padded path strides by the smallest such value (stride: 2147483647 must not pad 2^31 rows).
    tsh = max(kh, H + ph) if oh > 1 and sh > max(kh, H + ph) else sh
    tsw = max(kw, W + pw) if ow > 1 and sw > max(kw, W + pw) else sw
    tstride = (tsh, tsw)
    # Explicit padding that makes exactly oh x ow windows (negative = crop unused rows/cols).
    rh = (oh - 1) * tsh + kh - H - ph
    rw = (ow - 1) * tsw + kw - W - pw
    # Windows that start past the image (possible only without padding, ceil rounding, stride > kernel).
    empty_h = (oh - 1) * sh - ph >= H
    empty_w = (ow - 1) * sw - pw >= W

    if method == _PP.MAX:
        if torch_ok:
            if want_mask:
                y, idx = F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil, return_indices=True)
                return y, idx.to(x.dtype)
            return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil), None
        xp = F.pad(x, (pw, rw, ph, rh), value=-math.inf)
        if want_mask:
            y, idx = F.max_pool2d(xp, kernel, tstride, return_indices=True)
            Wp = W + pw + rw
            mask = (idx // Wp - ph) * W + (idx % Wp - pw)
        else:
            y, mask = F.max_pool2d(xp, kernel, tstride), None
        if empty_h or empty_w:
            # Caffe leaves -FLT_MAX (and mask -1) in windows that hold no image pixel.
            ih = torch.arange(oh, device=x.device) * sh - ph >= H
            iw = torch.arange(ow, device=x.device) * sw - pw >= W
            empty = ih[:, None] | iw[None, :]
            y = torch.where(empty, torch.full_like(y, -FLT_MAX), y)
            if mask is not None:
                mask = torch.where(empty, torch.full_like(mask, -1), mask)
        return y, (mask.to(x.dtype) if mask is not None else None)

    if method == _PP.AVE:
        if torch_ok:
            return F.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil, count_include_pad=True), None
        xp = F.pad(x, (pw, rw, ph, rh))
        total = F.avg_pool2d(xp, kernel, tstride, divisor_override=1)
        # Caffe's divisor: window clipped to the padded image (H + pad), not to the image.
        hs = torch.arange(oh, device=x.device) * sh - ph
        ws = torch.arange(ow, device=x.device) * sw - pw
        dh = torch.clamp(hs + kh, max=H + ph) - hs
        dw = torch.clamp(ws + kw, max=W + pw) - ws
        div = (dh[:, None] * dw[None, :]).to(x.dtype)
        return total / div, None

    if method == _PP.STOCHASTIC:
        xp = F.pad(x, (0, rw, 0, rh))
        if not train:
            # Caffe's GPU test-time rule: probability-weighted average sum(x^2) / sum(x).
            s1 = F.avg_pool2d(xp, kernel, tstride, divisor_override=1)
            s2 = F.avg_pool2d(xp * xp, kernel, tstride, divisor_override=1)
            return s2 / (s1 + FLT_MIN), None
        N, C = x.shape[0], x.shape[1]
        cols = F.unfold(xp.reshape(N * C, 1, xp.shape[-2], xp.shape[-1]), kernel, stride=tstride)  # (NC, k, L)
        cum = cols.cumsum(dim=1)
        thres = torch.rand(cols.shape[0], 1, cols.shape[2], device=x.device, dtype=x.dtype) * cum[:, -1:, :]
        pick = (cum >= thres).to(torch.uint8).argmax(dim=1, keepdim=True)
        y = cols.gather(1, pick)
        return y.reshape(N, C, oh, ow), None

    raise ValueError(f"unknown pooling method {method}")


def _pool_params(layer: Layer, pp) -> dict:
    """Validate a PoolingParameter as PoolingLayer::LayerSetUp does."""
    if pp.global_pooling:
        if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
            raise layer.error("with global_pooling: true, the kernel size cannot be specified")
        kernel = None
    else:
        has_hw = pp.HasField("kernel_h") and pp.HasField("kernel_w")
        if pp.HasField("kernel_size") == has_hw:
            if not pp.HasField("kernel_size") and (pp.HasField("kernel_h") or pp.HasField("kernel_w")):
                raise layer.error("for non-square filters both kernel_h and kernel_w are required")
            raise layer.error("filter size is kernel_size OR kernel_h and kernel_w; not both (and not neither)")
        kernel = (pp.kernel_size, pp.kernel_size) if pp.HasField("kernel_size") else (pp.kernel_h, pp.kernel_w)
        if kernel[0] <= 0 or kernel[1] <= 0:
            raise layer.error(f"filter dimensions must be > 0 (kernel {kernel})")
    if not ((not pp.HasField("pad") and pp.HasField("pad_h") and pp.HasField("pad_w"))
            or (not pp.HasField("pad_h") and not pp.HasField("pad_w"))):
        raise layer.error("pad is pad OR pad_h and pad_w are required")
    if not ((not pp.HasField("stride") and pp.HasField("stride_h") and pp.HasField("stride_w"))
            or (not pp.HasField("stride_h") and not pp.HasField("stride_w"))):
        raise layer.error("stride is stride OR stride_h and stride_w are required")
    pad = (pp.pad, pp.pad) if not pp.HasField("pad_h") else (pp.pad_h, pp.pad_w)
    stride = (pp.stride, pp.stride) if not pp.HasField("stride_h") else (pp.stride_h, pp.stride_w)
    if stride[0] <= 0 or stride[1] <= 0:
        raise layer.error(f"stride must be > 0 (stride {stride})")
    if pp.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise layer.error("with global_pooling: true, only pad = 0 and stride = 1 are allowed")
    if pad != (0, 0):
        if pp.pool not in (_PP.AVE, _PP.MAX):
            raise layer.error("padding is implemented only for average and max pooling")
        if kernel is not None and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
            raise layer.error(f"pad {pad} must be smaller than the kernel {kernel}")
    return dict(kernel=kernel, stride=stride, pad=pad, ceil=pp.round_mode == _PP.CEIL, method=pp.pool)


@register("Pooling")
class Pooling(Layer):
    """Caffe pooling (4-D only): CEIL output size by default, last window dropped when it would start
    in the right/bottom padding (only when any pad is set), MAX ties keep the first maximum in scan
    order, AVE divides by the window clipped to image+pad (padding counts, ceil overflow does not).
    A second top (MAX only) is Caffe's mask: the argmax's flat index into H*W, as float, no gradient.
    STOCHASTIC: TEST uses Caffe's GPU rule sum(x^2)/sum(x); TRAIN samples with torch's RNG (Caffe's
    random stream cannot be reproduced, only the distribution).
    """

    min_bottoms = max_bottoms = 1
    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes: list[Shape]) -> None:
        pp = self.param.pooling_param
        cfg = _pool_params(self, pp)
        self.method = cfg["method"]
        self.global_pooling = bool(pp.global_pooling)
        self.kernel, self.stride, self.pad, self.ceil = cfg["kernel"], cfg["stride"], cfg["pad"], cfg["ceil"]
        self.want_mask = len(self.param.top) == 2
        if self.want_mask and self.method != _PP.MAX:
            raise self.error("a second (mask) top is only available for MAX pooling")
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got {bottom_shapes[0]}")

    def _kernel(self, H: int, W: int) -> tuple[int, int]:
        return (H, W) if self.global_pooling else self.kernel

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        N, C, H, W = bottom_shapes[0]
        kh, kw = self._kernel(H, W)
        clip = bool(self.pad[0] or self.pad[1])
        oh = _pooled_size(H, kh, self.stride[0], self.pad[0], self.ceil, clip)
        ow = _pooled_size(W, kw, self.stride[1], self.pad[1], self.ceil, clip)
        return [(N, C, oh, ow)] * len(self.param.top)

    def forward(self, x: torch.Tensor):
        H, W = x.shape[-2], x.shape[-1]
        if 0 in tuple(x.shape[1:]):  # a 0 channel/spatial axis: Caffe's loops run zero times (torch refuses)
            shapes = self.top_shapes([tuple(int(d) for d in x.shape)])
            outs = tuple(x.new_zeros(s) for s in shapes)
            return outs if self.want_mask else outs[0]
        if self.global_pooling and self.method == _PP.AVE:
            return x.mean(dim=(2, 3), keepdim=True)
        y, mask = pool2d(x, self.method, self._kernel(H, W), self.stride, self.pad, self.ceil,
                         self.want_mask, train=self.phase == caffe_pb2.TRAIN)
        if self.want_mask:
            return y, mask
        return y


# --------------------------------------------------------------------------------------------------
# SPP
# --------------------------------------------------------------------------------------------------
@register("SPP")
class SPP(Layer):
    """Spatial pyramid pooling: level l pools into 2^l bins per axis with kernel = stride =
    ceil(H/2^l) and pad = (kernel*2^l - H + 1)//2 (Caffe Pooling rules, so CEIL sizes and pad
    clipping may change the bin count), each level flattened, all concatenated on axis 1.
    With pyramid_height 1 the single pooling output is returned unflattened (N, C, 1, 1).
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        sp = self.param.spp_param
        self.height = int(sp.pyramid_height)
        if self.height < 1:
            raise self.error("pyramid_height must be >= 1")
        self.method = {caffe_pb2.SPPParameter.MAX: _PP.MAX, caffe_pb2.SPPParameter.AVE: _PP.AVE,
                       caffe_pb2.SPPParameter.STOCHASTIC: _PP.STOCHASTIC}[sp.pool]
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got {bottom_shapes[0]}")
        self._levels(bottom_shapes[0][2], bottom_shapes[0][3])

    def _levels(self, H: int, W: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        if H <= 0 or W <= 0:
            raise self.error("input dimensions cannot be zero")
        levels = []
        for lvl in range(self.height):
            bins = 2**lvl
            kh, kw = -(-H // bins), -(-W // bins)
            ph, pw = (kh * bins - H + 1) // 2, (kw * bins - W + 1) // 2
            if (ph or pw) and (self.method == _PP.STOCHASTIC or ph >= kh or pw >= kw):
                raise self.error(
                    f"pyramid level {lvl} on {H}x{W} needs pad ({ph}, {pw}) with kernel ({kh}, {kw}), which "
                    "Caffe's Pooling rejects (pad must be < kernel, and STOCHASTIC allows no pad)"
                )
            levels.append(((kh, kw), (ph, pw)))
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2], x.shape[-1]
        train = self.phase == caffe_pb2.TRAIN
        outs = []
        for k, p in self._levels(H, W):
            y, _ = pool2d(x, self.method, k, k, p, True, False, train)
            if self.height == 1:
                return y
            outs.append(y.flatten(1))
        return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------------
# LRN
# --------------------------------------------------------------------------------------------------
@register("LRN")
class LRN(Layer):
    """Local response normalisation. ACROSS_CHANNELS: ``scale = k + alpha/n * sum_window x^2``,
    ``top = x * scale^-beta``, with Caffe's own backward (``_LRNAcross``; under torch.compile,
    autograd's of the same forward); WITHIN_CHANNEL is Caffe's
    composition x * (1 + alpha * avgpool_n(x^2))^-beta, where the n x n average pooling pads (n-1)/2
    and always divides by n^2, and ``k`` is ignored.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        lp = self.param.lrn_param
        self.size = int(lp.local_size)
        if self.size % 2 != 1:
            raise self.error(f"LRN only supports odd values for local_size (got {self.size})")
        self.alpha, self.beta, self.k = float(lp.alpha), float(lp.beta), float(lp.k)
        # Caffe's scalars of CrossChannel{Forward,Backward} as Dtype: alpha/size, k, beta, and
        # 2*alpha*beta/size (computed in double, then stored as Dtype); float32 and float64 blobs
        a, b, n = self.alpha, self.beta, self.size
        self._f32 = (float(np.float32(a) / np.float32(n)), float(np.float32(self.k)), float(np.float32(b)),
                     float(np.float32(2.0 * a * b / n)))
        self._f64 = (a / n, self.k, b, 2.0 * a * b / n)
        self.region = lp.norm_region
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got {bottom_shapes[0]}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region == _LRN.ACROSS_CHANNELS:
            # Caffe's scalars as Dtype; float64 stays float64, bf16/fp16 (fast mode) compute in float32
            consts = self._f64 if x.dtype == torch.float64 else self._f32
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            if torch.compiler.is_compiling():  # autograd of the same forward (the Function slowed inductor)
                return _lrn_across(x, self.size, consts)[0]
            return run_function(_LRNAcross, x, self.size, consts)
        # A window wider than the blob only adds zero padding: clip it to n (same sums, the divisor stays
        # local_size), so that local_size: 2147483647 does not pad 2^30 rows.
        n = min(self.size, 2 * max(int(x.shape[2]), int(x.shape[3])) + 1)
        p = (n - 1) // 2
        avg = F.avg_pool2d(x * x, n, 1, p, ceil_mode=True, count_include_pad=True)
        if n < self.size:
            avg = avg * ((n / self.size) ** 2)
        return x * torch.pow(1.0 + self.alpha * avg, -self.beta)


def _channel_window_sum(t: torch.Tensor, size: int) -> torch.Tensor:
    """``sum_{|d| <= size//2} t[:, c + d]`` with zeros outside the channels (Caffe's padded window);
    offsets past the channel count add nothing, so a huge ``local_size`` costs no padding."""
    c = int(t.shape[1])
    h = min(size // 2, c - 1) if c else 0
    if h <= 0:
        return t
    p = F.pad(t, (0, 0, 0, 0, h, h))
    s = p[:, 0:c]
    for i in range(1, 2 * h + 1):
        s = s + p[:, i:i + c]
    return s


def _lrn_across(x: torch.Tensor, size: int, consts: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Caffe's CrossChannelForward: ``(top, scale, scale^-beta)``."""
    alpha_over_size, k, beta, _ = consts
    scale = _channel_window_sum(x * x, size) * alpha_over_size + k
    scale_pow = scale.pow(-beta)
    return x * scale_pow, scale, scale_pow


class _LRNAcross(torch.autograd.Function):
    """Caffe's ``CrossChannelBackward``: ``bottom_diff = top_diff * scale^-beta - 2*alpha*beta/size * x *
    window(top_diff * top / scale)`` (the forward is :func:`_lrn_across`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, consts: tuple[float, ...]) -> torch.Tensor:
        top, scale, scale_pow = _lrn_across(x, size, consts)
        ctx.save_for_backward(x, scale, scale_pow)
        ctx.size, ctx.cache_ratio = size, consts[3]
        return top

    @staticmethod
    @torch.autograd.function.once_differentiable  # Caffe has no second derivatives
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, scale, scale_pow = ctx.saved_tensors
        g = g.to(x.dtype)
        ratio = _channel_window_sum(g * (x * scale_pow) / scale, ctx.size)  # top_diff * top / scale
        return g * scale_pow - ctx.cache_ratio * (x * ratio), None, None


# --------------------------------------------------------------------------------------------------
# Crop
# --------------------------------------------------------------------------------------------------
@register("Crop")
class Crop(Layer):
    """Crops bottom 0 to bottom 1's shape on axes >= ``axis`` (default 2) starting at ``offset``
    (none: 0, one: broadcast, else one per cropped axis). Bottom 1 only gives a shape: no gradient.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1
    no_grad_bottoms = (1,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        a, b = bottom_shapes
        if len(a) != len(b):
            raise self.error(f"bottoms must have the same number of axes ({a} vs {b})")
        cp = self.param.crop_param
        self.axis = _canonical_axis(self, cp.axis, len(a))
        offs = list(cp.offset)
        n = len(a) - self.axis
        if len(offs) > 1 and len(offs) != n:
            raise self.error(
                f"number of offset values ({len(offs)}) must equal the number of dimensions from axis "
                f"{self.axis} on ({n})"
            )
        self.offsets = tuple(0 if not offs else int(offs[0 if len(offs) == 1 else i]) for i in range(n))
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        a, b = bottom_shapes
        for i, off in enumerate(self.offsets):
            ax = self.axis + i
            if a[ax] - off < b[ax]:
                raise self.error(
                    f"invalid crop parameters in dimension {ax}: size {a[ax]} - offset {off} < reference {b[ax]}"
                )
        return [(*a[: self.axis], *b[self.axis:])]

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        idx: list[slice] = [slice(None)] * self.axis
        for i, off in enumerate(self.offsets):
            idx.append(slice(off, off + ref.shape[self.axis + i]))
        return x[tuple(idx)]
