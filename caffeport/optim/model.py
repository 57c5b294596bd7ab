"""``from_solver``: a Caffe solver as PyTorch's three pieces, ``(model, optimizer, scheduler)``.

The model is the solver's TRAIN net as a ``torch.nn.Module`` (:class:`TrainModule`); the optimizer
is the :mod:`caffeport.optim` class of the solver's ``type`` over the model's parameters, one group
per ``(lr_mult, decay_mult)``; the scheduler is :class:`~caffeport.optim.scheduler.LRPolicy`.
Then the plain loop is Caffe's ``Solver::Step``::

    for it in range(param.max_iter):
        optimizer.zero_grad()
        for _ in range(param.iter_size):
            model.loss(model()).backward()   # data layers read the next batch
        optimizer.step()                     # clip -> /iter_size -> decay -> rule -> w -= update
        scheduler.step()

Differences from ``caffeport train``: no test nets, display, snapshots or signal handling (use
:func:`save_solverstate` / :func:`load_solverstate` for Caffe's snapshot files).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.net import NetModule
from caffeport.optim.optimizer import OPTIMIZERS, CaffeOptimizer, param_groups
from caffeport.optim.scheduler import LRPolicy

__all__ = ["TrainModule", "from_solver", "save_solverstate", "load_solverstate"]

PathLike = str | os.PathLike


class TrainModule(NetModule):
    """A TRAIN-phase net as an ``nn.Module`` (the same layers and parameter tensors as ``net``).

    ``model()`` runs the data layers for the next batch (``model(data=x, label=y)`` feeds tops by
    name) and returns the net outputs plus every loss top; ``model.loss(outputs)`` is Caffe's total
    loss ``sum(loss_weight * sum(top))``; ``model.params`` is ``{layer: [tensors]}`` in Caffe's
    order and shapes; ``model.param_groups_caffe()`` the optimizer groups.
    """

    def __init__(self, net: Any):
        super().__init__(net._plans, net.inputs, net.outputs)
        object.__setattr__(self, "net", net)  # not a submodule: its layers are already ours
        self.params: OrderedDict[str, list[torch.nn.Parameter]] = OrderedDict(
            (name, list(layer.blobs)) for name, layer in net.layer_dict.items() if len(layer.blobs))
        self._extra_tops = [t for t, _ in self.loss_tops if t not in self.output_names]
        self.fast: Any = None  # a caffeport.fast_train.FastTrain (from_solver(..., fast=True))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        if self.fast is not None:  # fast mode: the outputs and loss tops, fp32, with their graph
            return self.fast.forward(feeds)
        table = self.run(feeds)
        names = self.output_names + [t for t in self._extra_tops if t not in self.output_names]
        return {name: table[name] for name in names}

    def loss(self, table: Mapping[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """Caffe's net loss (``loss_weight * sum(top)`` summed over the weighted tops)."""
        missing = [t for t, _ in self.loss_tops if t not in table]
        if missing:
            raise CaffeportError(f"{self.net.source}: loss top(s) {', '.join(missing)} not in the outputs given")
        total = super().loss(table)
        if total is None:
            raise CaffeportError(f"{self.net.source}: the net has no loss (no top with a loss_weight)")
        return total

    def learnable_params(self) -> list[tuple[str, int, torch.nn.Parameter, float, float]]:
        """``(layer, index, param, lr_mult, decay_mult)`` per distinct blob, in Caffe's order."""
        return self.net.learnable_params()

    def caffe_params(self) -> list[torch.nn.Parameter]:
        """The distinct learnable blobs in Caffe's order (the ``.solverstate`` history order)."""
        return [p for _, _, p, _, _ in self.learnable_params()]

    def param_groups_caffe(self, include_frozen: bool = False) -> list[dict[str, Any]]:
        """One optimizer group per ``(lr_mult, decay_mult)``; frozen blobs left out by default."""
        return param_groups(self.learnable_params(), include_frozen)

    def save_caffemodel(self, path: PathLike) -> None:
        """Write the weights as a ``.caffemodel`` (or ``.caffemodel.h5``)."""
        self.net.save(path)


def _seed(param: Any, rank: int) -> None:
    if param.random_seed >= 0:  # as caffeport train: random_seed + rank
        torch.manual_seed(int(param.random_seed) + rank)
        np.random.seed((int(param.random_seed) + rank) % (2**32))


def from_solver(solver: PathLike | Any, weights: PathLike | None = None,
                device: str | torch.device | None = None, *, net: PathLike | None = None,
                level: int | None = None, stages: Sequence[str] | None = None,
                include_frozen: bool = False, fast: bool | Mapping[str, Any] = False,
                ) -> tuple[TrainModule, CaffeOptimizer, LRPolicy]:
    """``(model, optimizer, scheduler)`` for a solver prototxt (or ``SolverParameter``).

    The train net is resolved as ``caffeport train`` does (``net``/``train_net``... relative to the
    working directory or the solver's folder, ``net=`` overrides it, ``level``/``stages`` set
    ``train_state`` as ``caffeport train --level/--stage``), the solver's ``weights:`` and
    then ``weights`` (comma-separated caffemodels) are copied by layer name, ``random_seed`` seeds
    torch (``+ rank`` under ``torch.distributed``). ``device`` defaults to the solver's
    ``solver_mode``/``device_id`` (CPU when CUDA is missing). ``fast=True`` (or a dict of
    :class:`caffeport.fast_train.FastTrain` options: ``precision``, ``compile``, ``channels_last``,
    ``tolerances``) runs the model's forward/backward in fast mode (checked against exact on the
    first call); the optimizer is the same Caffe-exact one."""
    from caffeport.proto import caffe_pb2
    from caffeport.solver.solver import _rank, _read_param, build_train_net

    param, source, _ = _read_param(solver, net)
    if level is not None:
        param.train_state.level = int(level)
    if stages:
        param.train_state.stage.extend([s for s in stages if s])
    kind = param.type or "SGD"
    if kind not in OPTIMIZERS:
        from caffeport.errors import nearest

        raise CaffeportError(f"{source}: unknown solver type \"{kind}\" (Caffe knows {', '.join(OPTIMIZERS)})"
                             f"{nearest(kind, OPTIMIZERS)}")
    if device is None:
        use_gpu = param.solver_mode == caffe_pb2.SolverParameter.GPU and torch.cuda.is_available()
        device = torch.device("cuda", int(param.device_id)) if use_gpu else torch.device("cpu")
    _seed(param, _rank())
    train_net = build_train_net(param, source, torch.device(device))
    for w in list(param.weights) + ([os.fspath(weights)] if weights is not None else []):
        for one in str(w).split(","):
            one = one.strip()
            if not one:
                continue
            if not Path(one).exists():
                raise CaffeportError(f"{source}: weights file not found: {one}")
            train_net.copy_from(one)
    model = TrainModule(train_net)
    if fast:
        from caffeport.fast_train import FastTrain

        model.fast = FastTrain(train_net, **(dict(fast) if isinstance(fast, Mapping) else {}))
    optimizer = OPTIMIZERS[kind](model.param_groups_caffe(include_frozen), param)
    optimizer.source = source
    scheduler = LRPolicy(optimizer, param)
    scheduler.source = source
    return model, optimizer, scheduler


def save_solverstate(path: PathLike, model: TrainModule, optimizer: CaffeOptimizer,
                     scheduler: LRPolicy | None = None, caffemodel: PathLike | None = None) -> None:
    """Write Caffe's snapshot pair: the weights to ``caffemodel`` (when given) and a ``.solverstate``
    (``.h5``: HDF5) with ``iter``, ``current_step``, ``learned_net`` and the history in Caffe's order,
    loadable by ``caffe train -snapshot`` / ``caffeport train --snapshot``."""
    from caffeport.io import write_solverstate

    if caffemodel is not None:
        model.save_caffemodel(caffemodel)
    step = scheduler.solverstate_step if scheduler is not None else 0
    st = optimizer.to_solverstate(model.caffe_params(), os.fspath(caffemodel) if caffemodel else "", step)
    write_solverstate(st, path)


def load_solverstate(path: PathLike, model: TrainModule, optimizer: CaffeOptimizer,
                     scheduler: LRPolicy | None = None) -> None:
    """Resume from a Caffe ``.solverstate``: weights from its ``learned_net`` (when present), the
    optimizer's ``iter`` and history, the scheduler's iteration and ``current_step``."""
    from caffeport.solver import snapshot as snap

    st = snap.read_state(path)
    if st.learned_net:
        model.net.copy_from(str(snap.resolve_learned_net(st.learned_net, path)))
    optimizer.load_solverstate(st, model.caffe_params())
    if scheduler is not None:
        scheduler.restore(int(st.iter), int(st.current_step))
