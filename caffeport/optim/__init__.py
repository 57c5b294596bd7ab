"""Caffe's solvers in PyTorch's own shapes: ``torch.optim`` optimizers, an ``LRScheduler`` and
:func:`from_solver` (``model, optimizer, scheduler`` from a solver prototxt).

::

    model, optimizer, scheduler = caffeport.from_solver("solver.prototxt", weights="init.caffemodel")
    for it in range(param.max_iter):                 # param = caffeport.read_solver("solver.prototxt")
        optimizer.zero_grad()
        for _ in range(param.iter_size):
            model.loss(model()).backward()           # the data layers read the next batch
        optimizer.step()                             # Caffe's ApplyUpdate
        scheduler.step()                             # Caffe's lr_policy
    caffeport.optim.save_solverstate("x_iter_N.solverstate", model, optimizer, scheduler,
                                     caffemodel="x_iter_N.caffemodel")

On a module of your own: ``caffeport.optim.SGD([{"params": [w]}, {"params": [b], "lr_mult": 2,
"decay_mult": 0}], "solver.prototxt")`` and ``caffeport.optim.LRPolicy(optimizer, "solver.prototxt")``.

The update math is :mod:`caffeport.solver.updates` (shared with ``caffeport train``); the lr
policies are :mod:`caffeport.solver.policies`. See :mod:`caffeport.optim.optimizer` for where the
optimizers differ from ``torch.optim``'s.
"""

from __future__ import annotations

from caffeport.optim.model import TrainModule, from_solver, load_solverstate, save_solverstate
from caffeport.optim.optimizer import (
    OPTIMIZERS,
    SGD,
    AdaDelta,
    AdaGrad,
    Adam,
    CaffeOptimizer,
    Nesterov,
    RMSProp,
    param_groups,
)
from caffeport.optim.scheduler import LRPolicy

LRScheduler = LRPolicy  # the name the issue uses

__all__ = [
    "CaffeOptimizer", "SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam", "OPTIMIZERS",
    "LRPolicy", "LRScheduler", "param_groups", "TrainModule", "from_solver", "save_solverstate",
    "load_solverstate",
]
