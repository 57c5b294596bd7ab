"""Loss layers and Accuracy, with Caffe's normalizers, ignore rules, clamps and gradients.

Shared rules (``loss_layer.cpp``, ``softmax_loss_layer.cpp``):

- a loss top is a scalar (shape ``()``); the net applies ``loss_weight`` (default 1 on top 0), the
  forward here returns the plain loss and backward scales by the incoming top diff;
- labels arrive as float blobs and are truncated toward zero (``static_cast<int>``);
- ``LossParameter.normalization``: FULL = outer*inner, VALID = non-ignored count (FULL without an
  ``ignore_label``), BATCH_SIZE = outer, NONE = 1, always clamped to at least 1. The legacy
  ``normalize`` bool maps to VALID/BATCH_SIZE only when ``normalization`` is absent.

Where Caffe's hand-written gradient is not the derivative of its own (clamped) forward, a
``torch.autograd.Function`` reproduces Caffe's numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.layers.base import Layer, Shape, register, run_function
from caffeport.proto import caffe_pb2

_NORM = caffe_pb2.LossParameter
FLT_MIN = float(np.finfo(np.float32).tiny)  # 1.17549435e-38
LOG_FLT_MIN = math.log(FLT_MIN)
K_LOG_THRESHOLD = 1e-20  # caffe/layers/loss_layer.hpp kLOG_THRESHOLD


def _canonical_axis(axis: int, ndim: int, layer: Layer, field: str) -> int:
    if not -ndim <= axis < ndim:
        raise layer.error(f"{field} {axis} is out of range for a {ndim}-axis bottom")
    return axis % ndim


def _count(shape: Shape, start: int = 0, end: int | None = None) -> int:
    return int(math.prod(shape[start:end]))


def _legacy_dims(shape: Shape) -> tuple[int, int, int, int]:
    """Caffe's num/channels/height/width of a blob of at most 4 axes (missing trailing axes are 1)."""
    s = tuple(shape) + (1,) * (4 - len(shape))
    return s[0], s[1], s[2], s[3]


def _labels(label: torch.Tensor) -> torch.Tensor:
    """Float label blob -> integer labels as ``static_cast<int>`` (truncation toward zero)."""
    return label.detach().to(torch.int64)


def _check_labels(layer: Layer, label: torch.Tensor, num_classes: int, ignore: int | None = None) -> None:
    """Refuse labels outside ``[0, num_classes)`` (``ignore`` exempt) with an error naming the layer.

    Caffe only DCHECKs this (a debug build aborts, a release build reads out of bounds); PyTorch would
    raise an opaque index error. Skipped while tracing/exporting and on shape-inference fake tensors."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(label):
        return
    t = torch.trunc(label.detach().to(torch.float64))
    bad = ~torch.isfinite(t) | (t < 0) | (t >= num_classes)
    if ignore is not None:
        bad &= t != ignore
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        v = float(t.reshape(-1)[i])
        shown = int(v) if math.isfinite(v) else v
        raise layer.error(f"label {shown} out of range [0, {num_classes}) at label index {i} of bottom "
                          f"'{layer.param.bottom[1] if len(layer.param.bottom) > 1 else '?'}'"
                          + (f" (ignore_label {ignore})" if ignore is not None else ""))


def _normalization_mode(layer: Layer, default: int) -> int:
    lp = layer.param.loss_param
    if lp.HasField("normalization"):
        return lp.normalization
    if lp.HasField("normalize"):
        return _NORM.VALID if lp.normalize else _NORM.BATCH_SIZE
    return default


def _normalizer(mode: int, outer: int, inner: int, valid: torch.Tensor | None) -> torch.Tensor | float:
    """Caffe's get_normalizer: ``valid`` is the non-ignored count (None = no ignore_label)."""
    if mode == _NORM.FULL:
        n: torch.Tensor | float = float(outer * inner)
    elif mode == _NORM.VALID:
        n = float(outer * inner) if valid is None else valid.to(torch.float32)
    elif mode == _NORM.BATCH_SIZE:
        n = float(outer)
    else:  # NONE
        n = 1.0
    if isinstance(n, torch.Tensor):
        return n.clamp_min(1.0)
    return max(1.0, n)


class _LossLayer(Layer):
    """Caffe's LossLayer: two bottoms with equal first dimension, a scalar top."""

    is_loss = True
    min_bottoms = 2
    max_bottoms = 2
    min_tops = 1
    max_tops = 1
    no_grad_bottoms = (1,)

    def _check_first_dim(self, bottom_shapes: list[Shape]) -> None:
        a, b = bottom_shapes[0], bottom_shapes[1]
        if (a[0] if a else 1) != (b[0] if b else 1):
            raise self.error(f"the data and label should have the same first dimension: {a} vs {b}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [()]


# --------------------------------------------------------------------------------------------------
# SoftmaxWithLoss
# --------------------------------------------------------------------------------------------------
class _SoftmaxLossFn(torch.autograd.Function):
    """x (O, C, I), label (O, I) int64, valid (O, I) bool, norm scalar -> -sum log p / norm.

    Forward uses log(max(p, FLT_MIN)); backward is Caffe's (p - onehot) on valid positions, without
    the clamp."""

    @staticmethod
    def forward(ctx, x, label, valid, norm):  # type: ignore[override]
        logp = torch.log_softmax(x, dim=1)
        picked = logp.gather(1, label.unsqueeze(1)).squeeze(1).clamp_min(LOG_FLT_MIN)
        loss = (0.0 - torch.where(valid, picked, torch.zeros_like(picked)).sum()) / norm  # Caffe: 0 - sum, +0 when none
        ctx.save_for_backward(logp, label, valid, torch.as_tensor(norm, dtype=x.dtype, device=x.device))
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        logp, label, valid, norm = ctx.saved_tensors
        grad = torch.exp(logp)
        grad.scatter_add_(1, label.unsqueeze(1), torch.full_like(grad[:, :1], -1.0))
        grad = grad * valid.unsqueeze(1).to(grad.dtype) * (g / norm)
        return grad, None, None, None


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(_LossLayer):
    """Softmax + multinomial logistic loss along ``softmax_param.axis``.

    Differs from ``F.cross_entropy``: Caffe's normalizer modes (VALID default, BATCH_SIZE counts only
    the outer dims, FULL counts ignored positions, NONE), the normalizer clamp to >= 1, the
    log(max(p, FLT_MIN)) clamp in forward (not in backward), and truncation of float labels.
    An optional second top is the softmax itself (Caffe passes no gradient back through it)."""

    max_tops = 2

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shape = bottom_shapes[0]
        self._check_first_dim(bottom_shapes)
        self.axis = _canonical_axis(self.param.softmax_param.axis, len(shape), self, "softmax_param.axis")
        lp = self.param.loss_param
        self.has_ignore = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        self.mode = _normalization_mode(self, _NORM.VALID)
        outer, inner = _count(shape, 0, self.axis), _count(shape, self.axis + 1)
        if outer * inner != _count(bottom_shapes[1]):
            raise self.error(
                f"number of labels must match number of predictions: label count {_count(bottom_shapes[1])}, "
                f"expected {outer * inner} (prediction shape {shape}, axis {self.axis})")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(), tuple(bottom_shapes[0])][: max(1, len(self.param.top))]

    def forward(self, x: torch.Tensor, label: torch.Tensor):
        shape = x.shape
        outer, c = _count(shape, 0, self.axis), int(shape[self.axis])
        inner = _count(shape, self.axis + 1)
        x3 = x.reshape(outer, c, inner)
        _check_labels(self, label, c, self.ignore_label if self.has_ignore else None)
        lab = _labels(label).reshape(outer, inner)
        if self.has_ignore:
            valid = lab != self.ignore_label
            lab = torch.where(valid, lab, torch.zeros_like(lab))
            count = valid.sum()
        else:
            valid = torch.ones_like(lab, dtype=torch.bool)
            count = None
        norm = _normalizer(self.mode, outer, inner, count)
        loss = run_function(_SoftmaxLossFn, x3, lab, valid, norm)
        if len(self.param.top) >= 2:
            return loss, torch.softmax(x.detach(), dim=self.axis)
        return loss


# --------------------------------------------------------------------------------------------------
# SigmoidCrossEntropyLoss
# --------------------------------------------------------------------------------------------------
class _SigmoidCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, valid, norm):  # type: ignore[override]
        pos = (x >= 0).to(x.dtype)
        per = x * (target - pos) - torch.log1p(torch.exp(x - 2 * x * pos))
        loss = (0.0 - torch.where(valid, per, torch.zeros_like(per)).sum()) / norm  # Caffe: 0 - sum, +0 when none
        ctx.save_for_backward(x, target, valid, torch.as_tensor(norm, dtype=x.dtype, device=x.device))
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, target, valid, norm = ctx.saved_tensors
        grad = (torch.sigmoid(x) - target) * valid.to(x.dtype) * (g / norm)
        return grad, None, None, None


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(_LossLayer):
    """Element-wise sigmoid cross-entropy with (soft) targets.

    Differs from ``F.binary_cross_entropy_with_logits``: the default normalization is BATCH_SIZE
    (not the mean over elements), ``ignore_label`` compares the *truncated* target, so soft targets
    count; the gradient is sigmoid(x) - target exactly, scaled by loss_weight/normalizer."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if _count(bottom_shapes[0]) != _count(bottom_shapes[1]):
            raise self.error(f"inputs must have the same count: {bottom_shapes[0]} vs {bottom_shapes[1]}")
        self._check_first_dim(bottom_shapes)
        lp = self.param.loss_param
        self.has_ignore = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        self.mode = _normalization_mode(self, _NORM.BATCH_SIZE)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.detach().reshape(x.shape).to(x.dtype)
        outer = int(x.shape[0]) if x.dim() else 1
        inner = x.numel() // max(outer, 1)
        if self.has_ignore:
            valid = _labels(target) != self.ignore_label
            count = valid.sum()
        else:
            valid = torch.ones_like(x, dtype=torch.bool)
            count = torch.tensor(x.numel(), device=x.device)
        norm = _normalizer(self.mode, outer, inner, count)
        return run_function(_SigmoidCEFn, x, target, valid, norm)


# --------------------------------------------------------------------------------------------------
# MultinomialLogisticLoss / InfogainLoss
# --------------------------------------------------------------------------------------------------
class _MultinomialFn(torch.autograd.Function):
    """prob (N, D), label (N,) int64 -> -mean log(max(p[label], 1e-20)); the gradient at the label is
    -1/max(p, 1e-20) even where the clamp is active."""

    @staticmethod
    def forward(ctx, prob, label):  # type: ignore[override]
        p = prob.gather(1, label.unsqueeze(1)).clamp_min(K_LOG_THRESHOLD)
        ctx.save_for_backward(p, label)
        ctx.shape = prob.shape
        return -torch.log(p).sum() / prob.shape[0]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        p, label = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=p.dtype, device=p.device)
        grad.scatter_(1, label.unsqueeze(1), -(g / ctx.shape[0]) / p)
        return grad, None


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(_LossLayer):
    """-log of the probability of the true class, averaged over the batch (N = shape[0]).

    Differs from ``F.nll_loss(log(p))``: the probability is clamped at 1e-20 (kLOG_THRESHOLD) in
    forward *and* backward, so tiny probabilities give a finite -1/1e-20-scaled gradient."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self._check_first_dim(bottom_shapes)
        _, c, h, w = _legacy_dims(bottom_shapes[1])
        if (c, h, w) != (1, 1, 1):
            raise self.error(f"label must have one value per example, got shape {bottom_shapes[1]}")

    def forward(self, prob: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        n = int(prob.shape[0])
        _check_labels(self, label, int(prob.numel()) // max(n, 1))
        return run_function(_MultinomialFn, prob.reshape(n, -1), _labels(label).reshape(n))


def _read_blobproto(path: Path, layer: Layer) -> np.ndarray:
    from caffeport.io import read_blobproto

    try:
        return read_blobproto(path)
    except CaffeportError as e:
        raise layer.error(f"infogain_loss_param.source: {e}") from None


class _InfogainFn(torch.autograd.Function):
    """x (O, C, I) scores, label (O, I), valid (O, I), H (C, C), norm.

    Caffe's gradient is p * rowsum(H)[label] - H[label, :] (the exact derivative of the unclamped
    loss), whatever the log clamp did in forward."""

    @staticmethod
    def forward(ctx, x, label, valid, h, norm):  # type: ignore[override]
        prob = torch.softmax(x, dim=1)
        logp = torch.log(prob.clamp_min(K_LOG_THRESHOLD))  # (O, C, I)
        hrows = h[label]  # (O, I, C)
        per = -(hrows.permute(0, 2, 1) * logp).sum(1)  # (O, I)
        loss = torch.where(valid, per, torch.zeros_like(per)).sum() / norm
        ctx.save_for_backward(prob, hrows, valid, torch.as_tensor(norm, dtype=x.dtype, device=x.device))
        return loss, prob

    @staticmethod
    def backward(ctx, g, _gprob):  # type: ignore[override]
        prob, hrows, valid, norm = ctx.saved_tensors
        hr = hrows.permute(0, 2, 1)  # (O, C, I)
        grad = prob * hr.sum(1, keepdim=True) - hr
        grad = grad * valid.unsqueeze(1).to(grad.dtype) * (g / norm)
        return grad, None, None, None, None


@register("InfogainLoss")
class InfogainLoss(_LossLayer):
    """Softmax (along ``infogain_loss_param.axis``) + infogain-weighted log loss:
    loss = -sum_l H[label, l] * log(max(p_l, 1e-20)) / normalizer.

    As in BVLC Caffe 1.0 the layer applies the softmax itself (bottom 0 holds scores), supports
    ``ignore_label`` and ``normalization`` (default VALID; the deprecated ``normalize`` is an error),
    and takes H from ``infogain_loss_param.source`` (a binary BlobProto) or a third bottom. The
    gradient is Caffe's closed form (no clamp); H and labels get no gradient. An optional second
    top is the softmax."""

    max_bottoms = 3
    max_tops = 2
    no_grad_bottoms = (1, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shape = bottom_shapes[0]
        self._check_first_dim(bottom_shapes)
        ip = self.param.infogain_loss_param
        self.axis = _canonical_axis(ip.axis, len(shape), self, "infogain_loss_param.axis")
        lp = self.param.loss_param
        if lp.HasField("normalize"):
            raise self.error('loss_param.normalize is deprecated for InfogainLoss; use "normalization"')
        self.has_ignore = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        self.mode = lp.normalization
        outer, inner = _count(shape, 0, self.axis), _count(shape, self.axis + 1)
        self.num_labels = int(shape[self.axis])
        if outer * inner != _count(bottom_shapes[1]):
            raise self.error(
                f"number of labels must match number of predictions: label count {_count(bottom_shapes[1])}, "
                f"expected {outer * inner} (prediction shape {shape}, axis {self.axis})")
        k = self.num_labels
        if len(bottom_shapes) < 3:
            if not ip.source:
                raise self.error("infogain_loss_param.source must be specified (or H as a third bottom)")
            h = _read_blobproto(self.ctx.resolve(ip.source), self)
            if h.size != k * k:
                raise self.error(f"infogain matrix from {ip.source} has {h.size} values, expected {k}x{k}")
            self.register_buffer("H", torch.from_numpy(h.reshape(k, k).copy()), persistent=False)
        else:
            if _count(bottom_shapes[2]) != k * k:
                raise self.error(f"infogain bottom has shape {bottom_shapes[2]}, expected {k}x{k} values")
            self.H = None

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(), tuple(bottom_shapes[0])][: max(1, len(self.param.top))]

    def forward(self, x: torch.Tensor, label: torch.Tensor, h: torch.Tensor | None = None):
        shape = x.shape
        outer, c, inner = _count(shape, 0, self.axis), int(shape[self.axis]), _count(shape, self.axis + 1)
        hm = (self.H if h is None else h.detach()).reshape(c, c).to(x.dtype)
        _check_labels(self, label, c, self.ignore_label if self.has_ignore else None)
        lab = _labels(label).reshape(outer, inner)
        if self.has_ignore:
            valid = lab != self.ignore_label
            lab = torch.where(valid, lab, torch.zeros_like(lab))
            count: torch.Tensor | None = valid.sum()
        else:
            valid = torch.ones_like(lab, dtype=torch.bool)
            count = None
        norm = _normalizer(self.mode, outer, inner, count)
        loss, prob = run_function(_InfogainFn, x.reshape(outer, c, inner), lab, valid, hm, norm)
        if len(self.param.top) >= 2:
            return loss, prob.detach().reshape(shape)
        return loss


# --------------------------------------------------------------------------------------------------
# EuclideanLoss, HingeLoss, ContrastiveLoss, SmoothL1Loss
# --------------------------------------------------------------------------------------------------
@register("EuclideanLoss")
class EuclideanLoss(_LossLayer):
    """sum((a - b)^2) / (2 * shape[0]). Unlike a label loss both bottoms get gradients
    (+-(a - b)/N); the count of both bottoms must match."""

    no_grad_bottoms = ()

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self._check_first_dim(bottom_shapes)
        if _count(bottom_shapes[0]) != _count(bottom_shapes[1]):
            raise self.error(f"inputs must have the same dimension: {bottom_shapes[0]} vs {bottom_shapes[1]}")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = a - b.reshape(a.shape)
        return (d * d).sum() / (2.0 * a.shape[0])


@register("HingeLoss")
class HingeLoss(_LossLayer):
    """One-vs-all hinge loss: t = max(0, 1 + y*x) with y = -1 at the label and +1 elsewhere,
    loss = sum(t)/N (L1) or sum(t^2)/N (L2), N = shape[0], classes = count/N. The L1 gradient at
    t == 0 is 0 (Caffe's sign(0))."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self._check_first_dim(bottom_shapes)
        norm = self.param.hinge_loss_param.norm
        if norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"unknown hinge_loss_param.norm {norm}")
        self.l2 = norm == caffe_pb2.HingeLossParameter.L2

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        x2 = x.reshape(n, -1)
        _check_labels(self, label, int(x2.shape[1]))
        lab = _labels(label).reshape(n, 1)
        sign = torch.ones_like(x2).scatter_(1, lab, -1.0)
        t = torch.relu(1.0 + sign * x2)
        return ((t * t) if self.l2 else t).sum() / n


class _ContrastiveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, similar, margin, legacy):  # type: ignore[override]
        diff = a - b  # (N, C)
        dist_sq = (diff * diff).sum(1)
        if legacy:
            dis = torch.clamp_min(margin - dist_sq, 0.0)
        else:
            dis = torch.clamp_min(margin - torch.sqrt(dist_sq), 0.0) ** 2
        per = torch.where(similar, dist_sq, dis)
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return per.sum() / a.shape[0] / 2.0

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        diff, dist_sq, similar = ctx.saved_tensors
        n = diff.shape[0]
        alpha = g / n
        if ctx.legacy:
            mdist = ctx.margin - dist_sq
            beta = -alpha * torch.ones_like(dist_sq)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = ctx.margin - dist
            beta = -alpha * mdist / (dist + 1e-4)
        coef = torch.where(similar, alpha.expand_as(dist_sq),
                           torch.where(mdist > 0, beta, torch.zeros_like(beta)))
        ga = coef.unsqueeze(1) * diff
        return ga, -ga, None, None, None


@register("ContrastiveLoss")
class ContrastiveLoss(_LossLayer):
    """Siamese contrastive loss over pairs (a_i, b_i) with similarity bottom y_i (truncated to int,
    non-zero = similar): similar pairs add d^2, dissimilar max(margin - d, 0)^2 (or, with
    ``legacy_version``, max(margin - d^2, 0)); total / (2N).

    Caffe's gradient for dissimilar pairs uses mdist/(d + 1e-4), not the exact derivative, so it is
    finite at d == 0; a and b both get gradients, y gets none."""

    min_bottoms = 3
    max_bottoms = 3
    no_grad_bottoms = (2,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        a, b, y = bottom_shapes
        na, ca, ha, wa = _legacy_dims(a)
        nb, cb, hb, wb = _legacy_dims(b)
        _, cy, hy, wy = _legacy_dims(y)
        spatial = (ha, wa, hb, wb, cy, hy, wy)
        if len(a) > 4 or len(b) > 4 or ca != cb or spatial != (1,) * 7:
            raise self.error(f"bottoms must be (N, C, 1, 1), (N, C, 1, 1), (N, 1, 1, 1); got {a}, {b}, {y}")
        if na != nb or _count(y) != na:
            raise self.error(f"bottoms disagree on the number of pairs: {a}, {b}, {y}")
        p = self.param.contrastive_loss_param
        self.margin = float(p.margin)
        self.legacy = bool(p.legacy_version)

    def forward(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = int(a.shape[0])
        similar = _labels(y).reshape(n) != 0
        return run_function(_ContrastiveFn, a.reshape(n, -1), b.reshape(n, -1), similar, self.margin, self.legacy)


@register("SmoothL1Loss")
class SmoothL1Loss(_LossLayer):
    """Fast/Faster R-CNN smooth L1 (``rbgirshick/caffe-fast-rcnn``): d = w_in * (a - b);
    f(d) = 0.5 * sigma^2 * d^2 if |d| < 1/sigma^2 else |d| - 0.5/sigma^2; loss = sum(w_out * f(d)) / N
    with N = shape[0]. Optional inside/outside weight bottoms (both or neither) get no gradient;
    a and b both do. ``smooth_l1_loss_param.sigma`` defaults to 1."""

    max_bottoms = 4
    no_grad_bottoms = (2, 3)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if len(bottom_shapes) == 3:
            raise self.error("if weights are used, both inside and outside weights must be given (4 bottoms)")
        self._check_first_dim(bottom_shapes)
        _, c, h, w = _legacy_dims(bottom_shapes[0])
        for i, s in enumerate(bottom_shapes[1:], 1):
            if _legacy_dims(s)[1:] != (c, h, w):
                raise self.error(f"bottom {i} has shape {s}, expected (N, {c}, {h}, {w}) like bottom 0")
        sigma = 1.0
        if self.param.HasField("smooth_l1_loss_param"):
            sigma = float(getattr(self.param.smooth_l1_loss_param, "sigma", 1.0))
        self.sigma2 = sigma * sigma

    def forward(self, a: torch.Tensor, b: torch.Tensor, w_in: torch.Tensor | None = None,
                w_out: torch.Tensor | None = None) -> torch.Tensor:
        d = a - b.reshape(a.shape)
        if w_in is not None:
            d = w_in.detach().reshape(a.shape) * d
        ad = d.abs()
        quad = ad < 1.0 / self.sigma2
        err = torch.where(quad, 0.5 * self.sigma2 * d * d, ad - 0.5 / self.sigma2)
        if w_out is not None:
            err = w_out.detach().reshape(a.shape) * err
        return err.sum() / a.shape[0]


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------
@register("Accuracy")
class Accuracy(Layer):
    """Top-k accuracy along ``accuracy_param.axis``: an example is correct iff fewer than ``top_k``
    classes score >= the true class's score, so ties count *against* (unlike ``torch.topk``).
    ``ignore_label`` entries are skipped; the result is correct/count (0 when nothing counts). An
    optional second top holds per-class accuracy (0 for classes with no examples). No backward."""

    has_backward = False
    min_bottoms = 2
    max_bottoms = 2
    min_tops = 1
    max_tops = 2
    no_grad_bottoms = (0, 1)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shape = bottom_shapes[0]
        p = self.param.accuracy_param
        self.top_k = int(p.top_k)
        self.has_ignore = p.HasField("ignore_label")
        self.ignore_label = int(p.ignore_label)
        self.axis = _canonical_axis(p.axis, len(shape), self, "accuracy_param.axis")
        outer, inner = _count(shape, 0, self.axis), _count(shape, self.axis + 1)
        if outer * inner != _count(bottom_shapes[1]):
            raise self.error(
                f"number of labels must match number of predictions: label count {_count(bottom_shapes[1])}, "
                f"expected {outer * inner} (prediction shape {shape}, axis {self.axis})")
        self.num_labels = int(shape[self.axis])
        if self.top_k > _count(shape) // max(_count(bottom_shapes[1]), 1):
            raise self.error(f"top_k {self.top_k} must be less than or equal to the number of classes "
                             f"({self.num_labels})")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(), (self.num_labels,)][: max(1, len(self.param.top))]

    def forward(self, x: torch.Tensor, label: torch.Tensor):
        x = x.detach()
        shape = x.shape
        outer, c, inner = _count(shape, 0, self.axis), int(shape[self.axis]), _count(shape, self.axis + 1)
        x3 = x.reshape(outer, c, inner)
        _check_labels(self, label, c, self.ignore_label if self.has_ignore else None)
        lab = _labels(label).reshape(outer, inner)
        valid = lab != self.ignore_label if self.has_ignore else torch.ones_like(lab, dtype=torch.bool)
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        true_score = x3.gather(1, safe.unsqueeze(1))  # (O, 1, I)
        better = (x3 >= true_score).sum(1) - 1  # NaN true score: -1 -> counted correct, as Caffe
        correct = valid & (better < self.top_k)
        count = valid.sum()
        acc = torch.where(count > 0, correct.sum().to(x.dtype) / count.clamp_min(1).to(x.dtype),
                          torch.zeros((), dtype=x.dtype, device=x.device))
        if len(self.param.top) < 2:
            return acc
        flat = safe.reshape(-1)
        nums = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(
            0, flat, valid.reshape(-1).to(x.dtype))
        hits = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(
            0, flat, correct.reshape(-1).to(x.dtype))
        per_class = torch.where(nums > 0, hits / nums.clamp_min(1), torch.zeros_like(nums))
        return acc, per_class


__all__ = [
    "Accuracy", "ContrastiveLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
    "SigmoidCrossEntropyLoss", "SmoothL1Loss", "SoftmaxWithLoss",
]
