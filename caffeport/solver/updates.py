"""The six Caffe update rules (``ComputeUpdateValue`` of ``src/caffe/solvers/*_solver.cpp``), plus
Caffe's gradient clipping, ``iter_size`` normalisation and weight decay, vectorised over all
parameters with ``torch._foreach_*``.

Every function works *in place* on ``diffs`` (the parameters' ``.grad`` tensors, Caffe's diffs):
after :meth:`UpdateRule.compute` a diff holds the value Caffe subtracts from the weight
(``net->Update()``: ``w -= diff``). ``rates`` are the per-parameter local rates
``lr_policy(iter) * lr_mult``.

Where Caffe differs from ``torch.optim``:

- **SGD momentum**: Caffe ``v = momentum*v + lr*g; w -= v``; PyTorch ``v = momentum*v + g;
  w -= lr*v``. They agree only while lr is constant: after a ``step``/``multistep`` drop, Caffe's
  velocity still carries the old lr while PyTorch's is rescaled at once.
- **Nesterov**: ``v' = mu*v + lr*g; w -= (1+mu)*v' - mu*v`` (Sutskever's form on the lr-scaled
  velocity).
- **AdaGrad / RMSProp**: ``w -= lr*g / (sqrt(h) + delta)``; delta (default 1e-8) is *outside* the
  square root; RMSProp's decay is ``rms_decay`` (default 0.99), no momentum allowed.
- **AdaDelta**: decay is ``momentum``; ``delta`` is added to *both* accumulators inside the root,
  and the result is still multiplied by the learning rate (``base_lr: 1`` is the paper's method).
- **Adam**: ``t = iter + 1``; ``w -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v) + delta)``: delta
  is added to ``sqrt(v)`` of the *uncorrected* v, unlike ``torch.optim.Adam`` which adds eps to
  ``sqrt(v_hat)``; weight decay is Caffe's L2 term added to the gradient (not AdamW).
- **Weight decay** (``Regularize``) is added after the ``iter_size`` normalisation and after
  clipping, and is ``weight_decay * decay_mult * w`` (L2) or ``... * sign(w)`` (L1).
- **Clipping** (``clip_gradients``) scales all diffs by ``clip / ||g||`` when the global L2 norm of
  the *accumulated* (not yet ``iter_size``-normalised) diffs exceeds ``clip``.

History layout (what ``.solverstate`` holds, in ``learnable_params`` order): one set of blobs per
parameter; AdaDelta and Adam append a second set after the first (AdaDelta: squared-gradient
averages, then squared-update averages; Adam: first moments ``m``, then second moments ``v``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = [
    "UpdateRule", "SGDRule", "NesterovRule", "AdaGradRule", "RMSPropRule", "AdaDeltaRule", "AdamRule",
    "RULES", "clip_gradients", "normalize", "regularize", "caffe_update", "f32",
]

Tensors = list[torch.Tensor]


def f32(x: float) -> float:
    """``x`` rounded to float32 (Caffe computes its scalars as ``Dtype``)."""
    return float(np.float32(x))


def _groups(values: Sequence[float]) -> dict[float, list[int]]:
    """Indices grouped by equal scalar (per-parameter rates/decays take few distinct values), so
    that ``_foreach_add_(..., alpha=v)`` can run per group without temporaries."""
    out: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(float(v), []).append(i)
    return out


def _axpy(ys: Tensors, xs: Tensors, alphas: Sequence[float]) -> None:
    """``y += alpha_i * x`` for every pair, in place, without temporaries."""
    for a, idx in _groups(alphas).items():
        if a != 0:
            torch._foreach_add_([ys[i] for i in idx], [xs[i] for i in idx], alpha=a)


class UpdateRule:
    """Base of the update rules: reads its hyper-parameters from the SolverParameter.

    Like Caffe's ``update_``/``temp_`` blobs, scratch tensors are allocated once and reused.
    """

    name = "SGD"
    history_sets = 1  # AdaDelta and Adam keep two blobs per parameter
    uses_lr_free_history = False  # history grows from the diff even when the local rate is 0

    def __init__(self, param: caffe_pb2.SolverParameter, source: str = "<solver>"):
        self.param = param
        self.source = source
        self.momentum = f32(param.momentum)
        self.momentum2 = f32(param.momentum2)
        self.delta = f32(param.delta)
        self.rms_decay = f32(param.rms_decay)
        self._bufs: dict[tuple[int, int], torch.Tensor] = {}
        self.check()

    def check(self) -> None:
        """Caffe's constructor sanity checks."""

    def scratch(self, like: Tensors, slot: int = 0) -> Tensors:
        """Reusable scratch tensors shaped like ``like`` (contents undefined)."""
        out = []
        for i, t in enumerate(like):
            b = self._bufs.get((slot, i))
            if b is None or b.shape != t.shape or b.device != t.device or b.dtype != t.dtype:
                b = torch.empty_like(t)
                self._bufs[(slot, i)] = b
            out.append(b)
        return out

    def compute(self, diffs: Tensors, history: list[Tensors], rates: Sequence[float],
                it: int) -> None:
        """Turn ``diffs`` into update values in place (``history[s][i]`` is set ``s`` of param ``i``)."""
        raise NotImplementedError


class SGDRule(UpdateRule):
    """``v = momentum*v + lr*g``; update = ``v``."""

    name = "SGD"

    def compute(self, diffs: Tensors, history: list[Tensors], rates: Sequence[float], it: int) -> None:
        h = history[0]
        torch._foreach_mul_(h, self.momentum)
        _axpy(h, diffs, rates)
        torch._foreach_copy_(diffs, h)


class NesterovRule(UpdateRule):
    """``v' = momentum*v + lr*g``; update = ``(1+momentum)*v' - momentum*v``."""

    name = "Nesterov"

    def compute(self, diffs: Tensors, history: list[Tensors], rates: Sequence[float], it: int) -> None:
        h = history[0]
        old = self.scratch(h)
        torch._foreach_copy_(old, h)
        torch._foreach_mul_(h, self.momentum)
        _axpy(h, diffs, rates)
        torch._foreach_copy_(diffs, h)
        torch._foreach_mul_(diffs, f32(1.0 + self.momentum))
        torch._foreach_add_(diffs, old, alpha=-self.momentum)


def _scaled_by_rms(rule: UpdateRule, diffs: Tensors, h: Tensors, rates: Sequence[float]) -> None:
    """``diff = rate * diff / (sqrt(h) + delta)`` (AdaGrad, RMSProp)."""
    den = rule.scratch(h)
    torch._foreach_copy_(den, h)
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, rule.delta)
    torch._foreach_div_(diffs, den)
    torch._foreach_mul_(diffs, list(rates))


class AdaGradRule(UpdateRule):
    """``h += g^2``; update = ``lr * g / (sqrt(h) + delta)``."""

    name = "AdaGrad"
    uses_lr_free_history = True

    def check(self) -> None:
        if self.momentum != 0:
            raise CaffeportError(f"{self.source}: momentum cannot be used with AdaGrad (Caffe requires "
                                 f"momentum 0, got {self.momentum:g})")

    def compute(self, diffs: Tensors, history: list[Tensors], rates: Sequence[float], it: int) -> None:
        h = history[0]
        torch._foreach_addcmul_(h, diffs, diffs)
        _scaled_by_rms(self, diffs, h, rates)


class RMSPropRule(UpdateRule):
    """``h = rms_decay*h + (1-rms_decay)*g^2``; update = ``lr * g / (sqrt(h) + delta)``."""

    name = "RMSProp"
    uses_lr_free_history = True

    def check(self) -> None:
        if self.momentum != 0:
            raise CaffeportError(f"{self.source}: momentum cannot be used with RMSProp (Caffe requires "
                                 f"momentum 0, got {self.momentum:g}); use rms_decay")
        if not 0 <= self.rms_decay <= 1:
            raise CaffeportError(f"{self.source}: rms_decay should lie between 0 and 1, got {self.rms_decay:g}")

    def compute(self, diffs: Tensors, history: list[Tensors], rates: Sequence[float], it: int) -> None:
        h = history[0]
        torch._foreach_mul_(h, self.rms_decay)
        torch._foreach_addcmul_(h, diffs, diffs, value=f32(1.0 - self.rms_decay))
        _scaled_by_rms(self, diffs, h, rates)


class AdaDeltaRule(UpdateRule):
    """Zeiler's AdaDelta with decay ``momentum``: ``hg = m*hg + (1-m)*g^2``;
    ``u = g * sqrt((hu + delta) / (hg + delta))``; ``hu = m*hu + (1-m)*u^2``; update = ``lr*u``."""

    name = "AdaDelta"
    history_sets = 2
    uses_lr_free_history = True

    def compute(self, diffs: Tensors, history: list[Tensors], rates: Sequence[float], it: int) -> None:
        hg, hu = history
        m = self.momentum
        one_m = f32(1.0 - m)
        torch._foreach_mul_(hg, m)
        torch._foreach_addcmul_(hg, diffs, diffs, value=one_m)
        num = self.scratch(hu, 0)
        den = self.scratch(hg, 1)
        torch._foreach_copy_(num, hu)
        torch._foreach_add_(num, self.delta)
        torch._foreach_copy_(den, hg)
        torch._foreach_add_(den, self.delta)
        torch._foreach_div_(num, den)
        torch._foreach_sqrt_(num)
        torch._foreach_mul_(diffs, num)
        torch._foreach_mul_(hu, m)
        torch._foreach_addcmul_(hu, diffs, diffs, value=one_m)
        torch._foreach_mul_(diffs, list(rates))


class AdamRule(UpdateRule):
    """``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g^2``;
    update = ``lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + delta)`` with ``t = iter + 1``."""

    name = "Adam"
    history_sets = 2
    uses_lr_free_history = True

    def compute(self, diffs: Tensors, history: list[Tensors], rates: Sequence[float], it: int) -> None:
        mm, vv = history
        b1, b2 = self.momentum, self.momentum2
        t = it + 1
        correction = f32(math.sqrt(1.0 - math.pow(b2, t)) / (1.0 - math.pow(b1, t)))
        torch._foreach_mul_(mm, b1)
        torch._foreach_add_(mm, diffs, alpha=f32(1.0 - b1))
        torch._foreach_mul_(vv, b2)
        torch._foreach_addcmul_(vv, diffs, diffs, value=f32(1.0 - b2))
        den = self.scratch(vv)
        torch._foreach_copy_(den, vv)
        torch._foreach_sqrt_(den)
        torch._foreach_add_(den, self.delta)
        torch._foreach_copy_(diffs, mm)
        torch._foreach_div_(diffs, den)
        torch._foreach_mul_(diffs, [f32(r * correction) for r in rates])


RULES: dict[str, type[UpdateRule]] = {
    r.name: r for r in (SGDRule, NesterovRule, AdaGradRule, RMSPropRule, AdaDeltaRule, AdamRule)
}


def clip_gradients(diffs: Tensors, clip: float) -> tuple[float, float] | None:
    """Caffe's ``ClipGradients``: when the global L2 norm of all diffs exceeds ``clip`` (>= 0), scale
    every diff by ``clip / norm``. Returns ``(norm, scale)`` when it clipped, else None."""
    if clip < 0 or not diffs:
        return None
    norms = torch._foreach_norm(diffs)
    sumsq = torch.stack([n.double() for n in norms]).square().sum()
    norm = f32(math.sqrt(float(sumsq)))
    if norm > clip:
        scale = f32(clip / norm)
        torch._foreach_mul_(diffs, scale)
        return norm, scale
    return None


def normalize(diffs: Tensors, iter_size: int) -> None:
    """Caffe's ``Normalize``: divide the accumulated diffs by ``iter_size``."""
    if iter_size != 1 and diffs:
        torch._foreach_mul_(diffs, f32(1.0 / iter_size))


def regularize(diffs: Tensors, weights: Tensors, decays: Sequence[float], kind: str,
               source: str = "<solver>") -> None:
    """Caffe's ``Regularize``: ``diff += decay * w`` (L2) or ``diff += decay * sign(w)`` (L1), with
    ``decay = weight_decay * decay_mult`` per parameter; parameters with decay 0 are untouched."""
    idx = [i for i, d in enumerate(decays) if d != 0]
    if not idx:
        return
    ds = [diffs[i] for i in idx]
    ws = [weights[i] for i in idx]
    dec = [decays[i] for i in idx]
    if kind == "L2":
        _axpy(ds, ws, dec)
    elif kind == "L1":
        _axpy(ds, torch._foreach_sign(ws), dec)
    else:
        raise CaffeportError(f"{source}: unknown regularization_type \"{kind}\" (Caffe knows L2 and L1)")


def caffe_update(rule: UpdateRule, weights: Tensors, diffs: Tensors, history: list[Tensors],
                 rates: Sequence[float], decays: Sequence[float], *, it: int, clip: float = -1.0,
                 iter_size: int = 1, regularization: str = "L2",
                 source: str = "<solver>") -> tuple[float, float] | None:
    """Caffe's ``SGDSolver::ApplyUpdate`` after the rate is known, for the parameters given:
    clip (global norm of the accumulated diffs) -> ÷``iter_size`` -> weight decay -> the rule's
    update value -> ``w -= value``. ``diffs`` are overwritten with the update values (as Caffe's
    diffs are). The one implementation shared by :class:`caffeport.solver.Solver` and the
    :mod:`caffeport.optim` optimizers. Returns ``(norm, scale)`` when it clipped."""
    clipped = clip_gradients(diffs, float(clip))
    normalize(diffs, int(iter_size))
    regularize(diffs, weights, decays, regularization, source)
    if diffs:
        rule.compute(diffs, history, rates, it)
        torch._foreach_sub_(weights, diffs)
    return clipped
