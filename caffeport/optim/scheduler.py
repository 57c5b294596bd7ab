"""Caffe's ``lr_policy`` as a ``torch.optim.lr_scheduler.LRScheduler``.

``LRPolicy(optimizer, solver_param)`` sets every group's ``lr`` to Caffe's rate for the current
iteration (``SGDSolver::GetLearningRate``, computed by :func:`caffeport.solver.policies.learning_rate`,
the same code ``caffeport train`` uses): right after construction the rate of iteration 0, after
the k-th ``step()`` the rate of iteration k. Call ``step()`` once per iteration, after
``optimizer.step()``. Each group's policy starts from its ``initial_lr`` (the optimizer's ``lr``).

Where it differs from PyTorch's schedulers: ``multistep`` keeps Caffe's ``current_step``, which
advances by at most one per iteration and is part of the state (``state_dict()`` and
``.solverstate``), instead of being recomputed from the epoch as ``MultiStepLR`` does; rates are
rounded to float32 as Caffe's ``Dtype rate``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from caffeport.proto import caffe_pb2
from caffeport.solver.policies import POLICIES, learning_rate

__all__ = ["LRPolicy"]

PathLike = str | os.PathLike


class LRPolicy(LRScheduler):
    """Caffe's lr policies fixed/step/exp/inv/multistep/poly/sigmoid (``lr_policy``, ``gamma``,
    ``power``, ``stepsize``, ``stepvalue``, ``max_iter`` of ``solver_param``; keyword arguments
    override them). ``last_epoch`` is Caffe's ``iter``."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 solver_param: caffe_pb2.SolverParameter | PathLike | None = None, *, last_epoch: int = -1,
                 current_step: int = 0, **overrides: Any):
        from caffeport.errors import CaffeportError
        from caffeport.optim.optimizer import solver_parameter

        msg, source = solver_parameter(solver_param)
        for k, v in overrides.items():
            if k == "stepvalue":
                del msg.stepvalue[:]
                msg.stepvalue.extend(int(x) for x in v)
            elif k in ("lr_policy", "gamma", "power", "stepsize", "max_iter"):
                setattr(msg, k, v)
            else:
                raise CaffeportError(f"LRPolicy: unknown argument '{k}' (known: lr_policy, gamma, power, "
                                     "stepsize, stepvalue, max_iter)")
        if msg.lr_policy == "":
            raise CaffeportError(f"{source}: lr_policy is not set (Caffe has no default; e.g. lr_policy: \"fixed\")")
        if msg.lr_policy not in POLICIES:
            learning_rate(msg, 0, 0, source)  # raises the policy error
        self.solver_param = msg
        self.source = source
        self.current_step = int(current_step)
        self._step_before = int(current_step)
        self._computed_for: int | None = None
        self._last_rate = float("nan")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The rates of iteration ``last_epoch`` (advances ``current_step`` for multistep)."""
        it = int(self.last_epoch)
        rates = []
        # a second call for the same iteration starts again from the step counter it started from
        step = self._step_before if it == self._computed_for else self.current_step
        self._computed_for = it
        new_step = step
        for base in self.base_lrs:
            rate, new_step, _ = learning_rate(self.solver_param, it, step, self.source, base_lr=float(base))
            rates.append(rate)
        self._step_before = step
        self.current_step = new_step
        self._last_rate = rates[0] if rates else float("nan")
        return rates

    @property
    def rate(self) -> float:
        """Caffe's rate of the current iteration (first group; before any ``lr_mult``)."""
        return self._last_rate

    @property
    def solverstate_step(self) -> int:
        """Caffe's ``current_step`` between iterations, as a ``.solverstate`` written now holds it
        (before the advance that the rate of iteration ``last_epoch`` may have made)."""
        return int(self._step_before)

    def state_dict(self) -> dict[str, Any]:
        # the SolverParameter is not saved (rebuild the scheduler from the solver, then load)
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "solver_param")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)

    def restore(self, iteration: int, current_step: int) -> None:
        """Continue from Caffe's ``iter`` and ``current_step`` (a resumed solverstate): the groups get
        the rate of ``iteration`` with multistep's step counter as saved."""
        self.last_epoch = int(iteration)
        # learning_rate may advance current_step once at this iteration, exactly as Caffe's does.
        self.current_step = int(current_step)
        self._computed_for = None
        for g, r in zip(self.optimizer.param_groups, self.get_lr()):
            g["lr"] = r
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
