"""lr policies against their closed forms (Caffe's sgd_solver.cpp comments / caffe.proto)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2
from caffeport.solver.policies import learning_rate


def _param(**kw) -> caffe_pb2.SolverParameter:
    p = caffe_pb2.SolverParameter(base_lr=0.1, max_iter=100)
    for k, v in kw.items():
        if k == "stepvalue":
            p.stepvalue.extend(v)
        else:
            setattr(p, k, v)
    return p


def _rates(p: caffe_pb2.SolverParameter, n: int) -> tuple[list[float], list[int]]:
    rates, steps, cs = [], [], 0
    for it in range(n):
        r, cs, _ = learning_rate(p, it, cs)
        rates.append(r)
        steps.append(cs)
    return rates, steps


def c(x: float) -> float:
    """A solver field as Caffe holds it (proto ``float``)."""
    return float(np.float32(x))


CLOSED = {
    "fixed": (dict(), lambda it: 0.1),
    "step": (dict(gamma=0.5, stepsize=7), lambda it: 0.1 * 0.5 ** (it // 7)),
    "exp": (dict(gamma=0.97), lambda it: c(0.1) * c(0.97) ** it),
    "inv": (dict(gamma=1e-2, power=0.75), lambda it: 0.1 * (1 + 1e-2 * it) ** -0.75),
    "poly": (dict(power=2.0), lambda it: 0.1 * (1 - it / 100) ** 2),
    "sigmoid": (dict(gamma=0.2, stepsize=40), lambda it: 0.1 / (1 + math.exp(-0.2 * (it - 40)))),
}


@pytest.mark.parametrize("policy", sorted(CLOSED))
def test_policy_closed_form(policy: str) -> None:
    kw, f = CLOSED[policy]
    p = _param(lr_policy=policy, **kw)
    rates, _ = _rates(p, 100)
    ref = np.array([f(it) for it in range(100)])
    np.testing.assert_allclose(rates, ref, rtol=2e-6, atol=0)


def test_step_sets_current_step() -> None:
    _, steps = _rates(_param(lr_policy="step", gamma=0.5, stepsize=7), 30)
    assert steps == [it // 7 for it in range(30)]


def test_multistep_advances_at_most_once_per_iteration() -> None:
    p = _param(lr_policy="multistep", gamma=0.1, stepvalue=[3, 3, 8])
    rates, steps = _rates(p, 12)
    # it 3: first stepvalue reached -> 1; it 4: second (also 3) -> 2; it 8 -> 3
    assert steps == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    np.testing.assert_allclose(rates, [0.1 * 0.1**s for s in steps], rtol=1e-6)


def test_multistep_resumes_from_current_step() -> None:
    p = _param(lr_policy="multistep", gamma=0.1, stepvalue=[2, 5])
    r, cs, adv = learning_rate(p, 6, 1)  # restored at iter 6 with current_step 1
    assert cs == 2 and adv
    assert r == pytest.approx(0.1 * 0.01, rel=1e-6)


def test_policy_errors() -> None:
    with pytest.raises(CaffeportError, match="unknown lr_policy"):
        learning_rate(_param(lr_policy="cosine"), 0, 0)
    with pytest.raises(CaffeportError, match="stepsize"):
        learning_rate(_param(lr_policy="step", gamma=0.1), 0, 0)
