"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``).

The rate is computed from the iteration count *before* it is incremented (``iter`` = number of
updates done so far), and rounded to float32 as Caffe's ``Dtype rate`` is:

- ``fixed``: ``base_lr``
- ``step``: ``base_lr * gamma ^ floor(iter / stepsize)`` (also sets ``current_step``)
- ``exp``: ``base_lr * gamma ^ iter``
- ``inv``: ``base_lr * (1 + gamma * iter) ^ (-power)``
- ``multistep``: ``base_lr * gamma ^ current_step``, where ``current_step`` advances by **at most one
  per call** when ``iter >= stepvalue[current_step]``; it is part of the solver state, so a resumed
  run continues with it (PyTorch's ``MultiStepLR`` recomputes it from the epoch instead)
- ``poly``: ``base_lr * (1 - iter / max_iter) ^ power``
- ``sigmoid``: ``base_lr / (1 + exp(-gamma * (iter - stepsize)))``

Unlike PyTorch schedulers, the policy scales the *gradient* fed to the momentum history, not the
step taken from it (see :mod:`caffeport.solver.updates`).
"""

from __future__ import annotations

import math

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = ["learning_rate", "POLICIES"]

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def _f32(x: float) -> float:
    return float(np.float32(x))


def learning_rate(param: caffe_pb2.SolverParameter, it: int, current_step: int,
                  source: str = "<solver>", base_lr: float | None = None) -> tuple[float, int, bool]:
    """``(rate, new current_step, multistep advanced?)`` for iteration ``it`` (``base_lr`` overrides
    the message's, for optimizer param groups with their own initial lr).

    Raises :class:`CaffeportError` for an unknown policy or an invalid parameter (Caffe's CHECKs).
    """
    policy = param.lr_policy
    base = float(param.base_lr if base_lr is None else base_lr)
    gamma = float(param.gamma)
    advanced = False

    def need_gamma() -> None:
        if gamma < 0:
            raise CaffeportError(f"{source}: lr_policy \"{policy}\" needs gamma >= 0, got {gamma:g}")

    def need_stepsize() -> None:
        if param.stepsize <= 0:
            raise CaffeportError(f"{source}: lr_policy \"{policy}\" needs stepsize > 0, got {param.stepsize}")

    if policy == "fixed":
        rate = base
    elif policy == "step":
        need_stepsize()
        current_step = it // int(param.stepsize)
        need_gamma()
        rate = base * math.pow(gamma, current_step)
    elif policy == "exp":
        need_gamma()
        rate = base * math.pow(gamma, it)
    elif policy == "inv":
        need_gamma()
        rate = base * math.pow(_f32(1.0 + _f32(gamma * it)), -float(param.power))
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            advanced = True
        need_gamma()
        rate = base * math.pow(gamma, current_step)
    elif policy == "poly":
        if param.max_iter <= 0:
            raise CaffeportError(f"{source}: lr_policy \"poly\" needs max_iter > 0")
        frac = _f32(1.0 - _f32(_f32(it) / _f32(param.max_iter)))
        try:
            rate = base * math.pow(frac, float(param.power))
        except (ValueError, ZeroDivisionError):  # past max_iter: C's pow gives nan / inf
            rate = math.nan if frac < 0 else math.inf
    elif policy == "sigmoid":
        need_gamma()
        need_stepsize()
        rate = base * (1.0 / (1.0 + math.exp(-gamma * (float(it) - float(param.stepsize)))))
    else:
        raise CaffeportError(
            f"{source}: unknown lr_policy \"{policy}\" (Caffe knows: {', '.join(POLICIES)})"
        )
    return _f32(rate), int(current_step), advanced
