"""Neuron layers: element-wise activations (``include/caffe/layers/*_layer.hpp`` deriving NeuronLayer).

Each top has its bottom's shape. Where Caffe's backward is not the textbook derivative (thresholds,
kinks, special cases of ``Power``) the layer uses a ``torch.autograd.Function`` that computes Caffe's
numbers; everywhere else PyTorch's own kernels are used because their gradients agree with Caffe's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from caffeport.layers.base import TRAIN, Layer, Shape, register
from caffeport.proto import caffe_pb2


class _Neuron(Layer):
    """One bottom, one top of the same shape."""

    min_bottoms = 1
    max_bottoms = 1
    min_tops = 1
    max_tops = 1

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]


@register("AbsVal")
class AbsVal(_Neuron):
    """``|x|``; backward uses ``sign(x)`` with ``sign(0) = 0`` (as torch.abs). Caffe refuses to run it
    in place (its backward needs the input)."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if set(self.param.top) & set(self.param.bottom):
            raise self.error("does not allow in-place computation (top == bottom)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


_BNLL_THRESHOLD = 50.0


class _BNLLFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        # x > 0: x + log(1 + exp(-x)); else log(1 + exp(x)); both equal relu(x) + log1p(exp(-|x|)).
        return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        e = torch.exp(torch.clamp(x, max=_BNLL_THRESHOLD))
        return g * e / (e + 1.0)


@register("BNLL")
class BNLL(_Neuron):
    """Softplus ``log(1 + exp(x))``; Caffe's backward is ``e/(e+1)`` with ``e = exp(min(x, 50))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BNLLFn.apply(x)


@register("Clip")
class Clip(_Neuron):
    """Clamp to ``[min, max]``; the gradient passes where ``min <= x <= max`` (bounds included),
    which is torch.clamp's rule too."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both 'min' and 'max'")
        self.lo, self.hi = float(p.min), float(p.max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


@register("Dropout")
class Dropout(_Neuron):
    """Inverted dropout: TRAIN keeps each value with probability ``1-p`` and scales it by ``1/(1-p)``;
    TEST is the identity. The phase (not ``nn.Module.training``) decides, as in Caffe.

    The fast-rcnn fork's ``dropout_param.scale_train: false`` moves the scaling to TEST: TRAIN
    multiplies by the mask only, TEST by ``1-p``. Masks come from torch's RNG: Caffe's mask stream
    cannot be reproduced, only its distribution.
    """

    def setup(self, bottom_shapes: list[Shape]) -> None:
        dp = self.param.dropout_param
        self.p = float(dp.dropout_ratio)
        if not 0.0 <= self.p < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {self.p}")
        self.scale_train = bool(getattr(dp, "scale_train", True))
        self.train_phase = self.phase == TRAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.train_phase:
            if self.p == 0.0:
                return x.view_as(x)
            mask = (torch.rand_like(x) >= self.p).to(x.dtype)
            if self.scale_train:
                mask = mask * (1.0 / (1.0 - self.p))
            return x * mask
        if self.scale_train:
            return x.view_as(x)
        return x * (1.0 - self.p)


class _ELUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        y = F.elu(x, alpha)
        ctx.save_for_backward(x, y)
        ctx.alpha = alpha
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, y = ctx.saved_tensors
        return g * torch.where(x > 0, torch.ones_like(y), y + ctx.alpha), None


@register("ELU")
class ELU(_Neuron):
    """``x`` for x > 0, ``alpha (exp(x) - 1)`` otherwise; Caffe's backward for x <= 0 is
    ``top_diff * (y + alpha)`` (computed from the output, not ``alpha exp(x)``)."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.alpha = float(self.param.elu_param.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ELUFn.apply(x, self.alpha)


@register("Exp")
class Exp(_Neuron):
    """``base^(shift + scale x)``, computed as Caffe does: ``outer * exp(inner * x)`` with
    ``inner = scale ln(base)`` and ``outer = base^shift`` (base -1 means e)."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.exp_param
        base, scale, shift = float(p.base), float(p.scale), float(p.shift)
        if base != -1.0 and not base > 0:
            raise self.error(f"exp_param.base must be strictly positive (or -1 for e), got {base}")
        log_base = 1.0 if base == -1.0 else math.log(base)
        self.inner = log_base * scale
        self.outer = 1.0 if shift == 0 else (math.exp(shift) if base == -1.0 else base**shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp(x * self.inner) if self.inner != 1.0 else torch.exp(x)
        return y * self.outer if self.outer != 1.0 else y


@register("Log")
class Log(_Neuron):
    """``log_base(shift + scale x)`` (base -1 means e): ``ln(scale x + shift) / ln(base)``."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.log_param
        base = float(p.base)
        if base != -1.0 and not base > 0:
            raise self.error(f"log_param.base must be strictly positive (or -1 for e), got {base}")
        log_base = 1.0 if base == -1.0 else math.log(base)
        if log_base == 0.0:
            raise self.error("log_param.base 1 gives 1/log(base) = inf")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(p.scale), float(p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x
        if self.scale != 1.0:
            t = t * self.scale
        if self.shift != 0.0:
            t = t + self.shift
        y = torch.log(t)
        return y * self.base_scale if self.base_scale != 1.0 else y


class _PowerFn(torch.autograd.Function):
    """Caffe's PowerLayer: forward and its special-cased backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, power: float, scale: float, shift: float) -> torch.Tensor:
        ctx.params = (power, scale, shift)
        t = x
        if scale != 1.0:
            t = t * scale
        if shift != 0.0:
            t = t + shift
        y = torch.pow(t, power) if power != 1.0 else (t.clone() if t is x else t)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        power, scale, shift = ctx.params
        x, y = ctx.saved_tensors
        diff_scale = power * scale
        if power == 1.0:
            d = torch.full_like(x, diff_scale)
        elif power == 2.0:
            # dy/dx = diff_scale * scale * x + diff_scale * shift
            d = x * (diff_scale * scale)
            if shift != 0.0:
                d = d + diff_scale * shift
        elif shift == 0.0:
            # dy/dx = power * y / x (NaN/inf at x = 0, as in Caffe)
            d = y / x * power
        else:
            t = x
            if scale != 1.0:
                t = t * scale
            t = t + shift
            d = y / t
            if diff_scale != 1.0:
                d = d * diff_scale
        return g * d, None, None, None


@register("Power")
class Power(_Neuron):
    """``(shift + scale x)^power``. Caffe special-cases: power 0 or scale 0 -> constant output and a
    zero gradient; power 2 -> ``2 scale (shift + scale x)``; shift 0 -> ``power y / x`` (NaN at
    x = 0 where autograd would give 0); otherwise ``power scale y / (shift + scale x)``."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.power * self.scale == 0.0:
            value = 1.0 if self.power == 0.0 else self.shift**self.power
            return torch.full_like(x, value)  # no graph: the bottom diff stays zero, as Caffe's
        return _PowerFn.apply(x, self.power, self.scale, self.shift)


@register("PReLU")
class PReLU(_Neuron):
    """Leaky ReLU with learned slopes, one per channel (axis 1) or one shared 0-d blob.
    The slope filler defaults to constant 0.25; x == 0 takes the slope branch in backward."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(f"PReLU needs a bottom with at least 2 axes, got shape {shape}")
        p = self.param.prelu_param
        self.channel_shared = bool(p.channel_shared)
        if p.HasField("filler"):
            filler = p.filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.add_blob(() if self.channel_shared else (shape[1],), filler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.blobs[0]
        if self.channel_shared:
            w = w.reshape(1)
        return F.prelu(x, w)


@register("ReLU")
class ReLU(_Neuron):
    """``max(x, 0) + negative_slope min(x, 0)``; the gradient at x == 0 is ``negative_slope``."""

    can_run_inplace = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.slope = float(self.param.relu_param.negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slope == 0.0:
            return F.relu(x)
        return F.leaky_relu(x, self.slope)

    def forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        if self.slope == 0.0:
            return F.relu_(x)
        return F.leaky_relu_(x, self.slope)


@register("Sigmoid")
class Sigmoid(_Neuron):
    """Logistic function; Caffe computes ``0.5 tanh(0.5 x) + 0.5`` (equal up to rounding) and the
    backward ``y (1 - y)``, as torch.sigmoid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


@register("Swish")
class Swish(_Neuron):
    """``x sigmoid(beta x)``."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.beta = float(self.param.swish_param.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.beta == 1.0:
            return x * torch.sigmoid(x)
        return x * torch.sigmoid(x * self.beta)


@register("TanH")
class TanH(_Neuron):
    """Hyperbolic tangent; backward ``1 - y^2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


@register("Threshold")
class Threshold(_Neuron):
    """``1`` where ``x > threshold`` (strictly), else ``0``. Caffe has no backward for it."""

    has_backward = False

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.threshold = float(self.param.threshold_param.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)
