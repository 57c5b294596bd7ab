"""pycaffe's solvers (``caffe.SGDSolver(path)``, ``caffe.get_solver(path)``...): caffeport's solvers
whose ``net`` and ``test_nets`` are :class:`caffeport.compat.Net` (layers with ``.type`` strings and
numpy ``.blobs``, ``forward_all``...), plus pycaffe's ``share_weights`` and ``lr``.

Differences from pycaffe: ``snapshot()`` returns the (model, state) paths it wrote (pycaffe: None);
Caffe's CPU/GPU solver choice follows ``caffe.set_mode_*`` only through ``solver_mode``/``device``.
"""

from __future__ import annotations

import os
from typing import Any

from caffeport.solver import solver as _s

__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "get_solver", "get_solver_from_file"]


class _PycaffeSolver:
    """Mixin: the nets a solver builds are compat Nets; pycaffe's extra methods."""

    @staticmethod
    def _compat(net: Any) -> Any:
        from caffeport.compat._net import Net as CompatNet

        # A compat Net adds only views and checks to caffeport's Net (no state of its own in __init__).
        net.__class__ = CompatNet
        return net

    def _init_train_net(self) -> Any:
        return self._compat(super()._init_train_net())  # type: ignore[misc]

    def _init_test_nets(self) -> list[Any]:
        return [self._compat(n) for n in super()._init_test_nets()]  # type: ignore[misc]

    def _share_test_weights(self) -> None:
        """Caffe's ``ShareTrainedLayersWith`` on the raw layers (the compat views' numpy blobs would
        copy values rather than share memory): test nets see every update, as in pycaffe."""
        from caffeport.compat._net import Net as CompatNet

        for tn in self.test_nets:  # type: ignore[attr-defined]
            CompatNet.share_with(tn, self.net)  # type: ignore[attr-defined]

    def share_weights(self, net: Any) -> None:
        """pycaffe's ``solver.share_weights(net)``: ``net`` uses the train net's blobs (same memory)."""
        from caffeport.compat._net import Net as CompatNet

        CompatNet.share_with(net, self.net)  # type: ignore[attr-defined]

    @property
    def lr(self) -> float:
        """pycaffe's ``SGDSolver.lr``: the learning rate for the current iteration."""
        from caffeport.solver.policies import learning_rate

        return float(learning_rate(self.param, self.iter, self.current_step, self.source)[0])  # type: ignore[attr-defined]


class Solver(_PycaffeSolver, _s.Solver):
    pass


class SGDSolver(_PycaffeSolver, _s.SGDSolver):
    pass


class NesterovSolver(_PycaffeSolver, _s.NesterovSolver):
    pass


class AdaGradSolver(_PycaffeSolver, _s.AdaGradSolver):
    pass


class RMSPropSolver(_PycaffeSolver, _s.RMSPropSolver):
    pass


class AdaDeltaSolver(_PycaffeSolver, _s.AdaDeltaSolver):
    pass


class AdamSolver(_PycaffeSolver, _s.AdamSolver):
    pass


_BY_TYPE = {"SGD": SGDSolver, "Nesterov": NesterovSolver, "AdaGrad": AdaGradSolver, "RMSProp": RMSPropSolver,
            "AdaDelta": AdaDeltaSolver, "Adam": AdamSolver}


def get_solver(solver: str | os.PathLike, **kwargs: Any) -> Solver:
    """pycaffe's ``caffe.get_solver(path)``: the solver class the file's ``type`` names."""
    param, _, _ = _s._read_param(solver, kwargs.get("net"))
    cls = _BY_TYPE.get(param.type or "SGD", Solver)
    return cls(solver, **kwargs)


get_solver_from_file = get_solver  # the name older pycaffe used
