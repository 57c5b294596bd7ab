"""A pycaffe look-alike: legacy scripts run with only ``import caffe`` changed to
``import caffeport.compat as caffe``.

Covered: ``caffe.Net`` (both ``Net(model, weights, phase)`` and ``Net(model, phase, weights=...)``),
``caffe.TRAIN/TEST``, ``set_mode_cpu/gpu``, ``set_device``, ``set_random_seed``, ``caffe.io``,
``caffe.proto.caffe_pb2``, ``caffe.Classifier``, and the solvers (``get_solver``, ``SGDSolver``...).

As in pycaffe, blobs' ``data``/``diff`` are fixed memory: a numpy view taken once shows every later
forward, backward and solver step (while the blob's shape is unchanged); ``forward``/``backward``
run ``start``..``end`` layer ranges; the solvers' ``net``/``test_nets`` are ``caffe.Net``; exceptions
raised in Python layers reach the caller as themselves.

Differences from pycaffe worth knowing: on a CUDA device ``data``/``diff`` are copies (pycaffe syncs
to host memory); ``set_mode_gpu`` moves nets created afterwards to CUDA when it is available;
``backward()`` on a net with no loss at all and no ``force_backward`` still backpropagates the diffs
set on its outputs (Caffe would run no backward there); in-place BNLL/Power/Log/Clip get the
mathematically correct gradient (Caffe's reads the overwritten bottom).
"""

from __future__ import annotations

from typing import Any

from caffeport.compat import io, proto  # caffe.proto.caffe_pb2, and `from caffeport.compat.proto import ...`
from caffeport.compat._net import Net, set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from caffeport.layers.base import TEST, TRAIN

__all__ = [
    "Net", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "io", "proto",
    "Classifier", "get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
    "AdaDeltaSolver", "AdamSolver", "layer_type_list", "Layer",
]

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
                "AdaDeltaSolver", "AdamSolver", "Solver", "get_solver_from_file"}:
        from caffeport.compat import solver as _solver  # pycaffe's solvers: nets are caffe.Net

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
from caffeport.compat.classifier import Classifier  # noqa: E402  (a Net subclass, as in pycaffe)
from caffeport.compat.detector import Detector  # noqa: E402
from caffeport.compat.net_spec import NetSpec, layers, params, to_proto  # noqa: E402

__all__ += ["NetSpec", "layers", "params", "to_proto", "draw", "coord_map", "net_spec", "Detector", "Timer",
            "init_log", "log", "__version__", "solver_count", "set_solver_count", "solver_rank", "set_solver_rank",
            "set_multiprocess", "has_nccl", "NCCL"]
