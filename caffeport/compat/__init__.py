"""A pycaffe look-alike: legacy scripts run with only ``import caffe`` changed to
``import caffeport.compat as caffe``.

Covered: ``caffe.Net`` (both ``Net(model, weights, phase)`` and ``Net(model, phase, weights=...)``),
``caffe.TRAIN/TEST``, ``set_mode_cpu/gpu``, ``set_device``, ``set_random_seed``, ``caffe.io``,
``caffe.proto.caffe_pb2``, ``caffe.Classifier``, and the solvers (``get_solver``, ``SGDSolver``...).

Differences from pycaffe worth knowing: blobs' ``data``/``diff`` are numpy views of torch tensors
(on CPU); ``set_mode_gpu`` moves nets created afterwards to CUDA when it is available.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

import caffeport.proto.caffe_pb2  # noqa: F401  (makes caffe.proto.caffe_pb2 reachable)
from caffeport import proto
from caffeport.compat import io
from caffeport.compat.classifier import Classifier
from caffeport.errors import CaffeportError
from caffeport.layers.base import TEST, TRAIN
from caffeport.net import Net as _Net

__all__ = [
    "Net", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "io", "proto",
    "Classifier", "get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
    "AdaDeltaSolver", "AdamSolver", "layer_type_list", "Layer",
]

_MODE = {"device": "cpu", "device_id": 0}


def set_mode_cpu() -> None:
    _MODE["device"] = "cpu"


def set_mode_gpu() -> None:
    """Use CUDA for nets built afterwards when it is available (otherwise stay on the CPU)."""
    _MODE["device"] = "cuda" if torch.cuda.is_available() else "cpu"


def set_device(device_id: int) -> None:
    _MODE["device_id"] = int(device_id)


def set_random_seed(seed: int) -> None:
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % (2**32))


def _device() -> str:
    return f"cuda:{_MODE['device_id']}" if _MODE["device"] == "cuda" else "cpu"


class _LayerView:
    """pycaffe's layer object: ``type``, ``blobs``."""

    def __init__(self, layer: Any, blobs: list[Any]):
        self._layer = layer
        self.type = layer.param.type
        self.name = layer.name
        self.blobs = blobs

    def __repr__(self) -> str:
        return f"<caffe layer {self.name!r} ({self.type})>"


class Net(_Net):
    """``caffe.Net(model, weights, phase)`` / ``caffe.Net(model, phase, weights=...)`` /
    ``caffe.Net(model, phase)``."""

    def __init__(self, model: Any, *args: Any, weights: Any = None, phase: int | None = None,
                 level: int = 0, stages: Any = ()) -> None:
        rest = list(args)
        if rest and isinstance(rest[0], (str, bytes, os.PathLike)):
            weights = rest.pop(0)
        if rest:
            phase = rest.pop(0)
        if rest:
            raise CaffeportError("caffe.Net(model, [weights,] phase): too many arguments")
        if phase is None:
            raise CaffeportError("caffe.Net needs a phase: caffe.TRAIN or caffe.TEST")
        if isinstance(model, bytes):
            model = model.decode()
        if isinstance(weights, bytes):
            weights = weights.decode()
        # pycaffe runs Python layers unasked; so does the compat layer (caffeport.Net needs the opt-in)
        super().__init__(model, weights, phase, level=level, stages=tuple(stages or ()), device=_device(),
                         allow_python_layers=True)

    @property
    def layers(self) -> list[_LayerView]:  # type: ignore[override]
        params = self.params
        return [_LayerView(p.layer, list(params.get(p.layer.name, []))) for p in self._plans]

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    def copy_from(self, weights: Any) -> list[str]:  # type: ignore[override]
        if isinstance(weights, bytes):
            weights = weights.decode()
        return super().copy_from(weights)

    def forward_all(self, blobs: Any = None, **kwargs: Any) -> dict[str, np.ndarray]:
        """pycaffe's forward_all: run over the whole first axis of the inputs in batches."""
        outs = list(self.outputs) + [b for b in (blobs or []) if b not in self.outputs]
        all_outs: dict[str, list[np.ndarray]] = {o: [] for o in outs}
        n = len(next(iter(kwargs.values()))) if kwargs else 0
        batch = self.blobs[self.inputs[0]].num if self.inputs else 1
        for s in range(0, n, batch):
            chunk = {k: np.asarray(v[s:s + batch]) for k, v in kwargs.items()}
            got = len(next(iter(chunk.values())))
            if got < batch:  # pad the last batch like pycaffe
                chunk = {k: np.concatenate([v, np.zeros((batch - got,) + v.shape[1:], v.dtype)])
                         for k, v in chunk.items()}
            res = self.forward(blobs=outs, **chunk)
            for o in outs:
                all_outs[o].append(res[o][:got].copy())
        return {o: np.concatenate(v) if v else np.zeros((0,)) for o, v in all_outs.items()}


def _trusting(factory: Any) -> Any:
    """Wrap a solver class/factory so that the nets it builds may run Python layers (pycaffe's behaviour)."""
    import functools

    from caffeport.layers.base import allow_python_layers

    if isinstance(factory, type):
        class Trusting(factory):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                with allow_python_layers(True):
                    super().__init__(*args, **kwargs)

        Trusting.__name__ = Trusting.__qualname__ = factory.__name__
        return Trusting

    @functools.wraps(factory)
    def call(*args: Any, **kwargs: Any) -> Any:
        with allow_python_layers(True):
            return factory(*args, **kwargs)

    return call


def layer_type_list() -> list[str]:
    from caffeport.layers.base import registry

    return sorted(registry())


def __getattr__(name: str) -> Any:
    # Solvers come from caffeport.solver, imported only when a script asks for them.
    if name in {"get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
                "AdaDeltaSolver", "AdamSolver", "Solver"}:
        import caffeport.solver as _solver

        return _trusting(getattr(_solver, name))
    if name == "Layer":  # base class for Python layers (caffe.Layer)
        from caffeport.layers import python as _py

        return getattr(_py, "PythonLayerBase", object)
    raise AttributeError(name)

# pycaffe's net_spec, draw, coord_map, Detector and module-level helpers (caffeport/compat/*.py).
from caffeport.compat import coord_map, draw, net_spec  # noqa: E402
from caffeport.compat._misc import (  # noqa: E402
    NCCL,
    Timer,
    __version__,
    has_nccl,
    init_log,
    log,
    set_multiprocess,
    set_solver_count,
    set_solver_rank,
    solver_count,
    solver_rank,
)
from caffeport.compat.detector import Detector  # noqa: E402
from caffeport.compat.net_spec import NetSpec, layers, params, to_proto  # noqa: E402

__all__ += ["NetSpec", "layers", "params", "to_proto", "draw", "coord_map", "net_spec", "Detector", "Timer",
            "init_log", "log", "__version__", "solver_count", "set_solver_count", "solver_rank", "set_solver_rank",
            "set_multiprocess", "has_nccl", "NCCL"]
