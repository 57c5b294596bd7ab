"""Caffe's solvers on caffeport nets: the same lrs, updates, log lines and snapshots as ``caffe train``.

``get_solver(path)`` / ``SGDSolver(path)`` ... as pycaffe; see :mod:`caffeport.solver.solver` for the
loop, :mod:`~caffeport.solver.updates` for the six update rules (and how they differ from
``torch.optim``), :mod:`~caffeport.solver.policies` for the lr policies.
"""

from __future__ import annotations

from caffeport.solver.logging import Glog
from caffeport.solver.policies import learning_rate
from caffeport.solver.solver import (
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    SignalActions,
    Solver,
    get_solver,
)

__all__ = [
    "Solver",
    "SGDSolver",
    "NesterovSolver",
    "AdaGradSolver",
    "RMSPropSolver",
    "AdaDeltaSolver",
    "AdamSolver",
    "get_solver",
    "Glog",
    "SignalActions",
    "learning_rate",
]
