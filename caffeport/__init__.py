"""caffeport: Caffe's files, nets and solvers on PyTorch, exactly as Caffe runs them.

Common entry points (imported lazily so ``import caffeport`` stays cheap)::

    import caffeport
    net = caffeport.Net("deploy.prototxt", "weights.caffemodel", caffeport.TEST)
    out = net.forward(data=batch)["prob"]
    solver = caffeport.get_solver("solver.prototxt"); solver.solve()
    weights = caffeport.load_caffemodel("weights.caffemodel")   # {layer: [ndarray, ...]}
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

TRAIN = 0  # caffe_pb2.TRAIN
TEST = 1  # caffe_pb2.TEST

_LAZY = {
    "Net": "caffeport.net",
    "NetModule": "caffeport.net",
    "load_module": "caffeport.net",
    "CaffeportError": "caffeport.errors",
    "read_net": "caffeport.io",
    "read_solver": "caffeport.io",
    "write_net": "caffeport.io",
    "write_solver": "caffeport.io",
    "load_caffemodel": "caffeport.io",
    "save_caffemodel": "caffeport.io",
    "read_blobproto": "caffeport.io",
    "write_blobproto": "caffeport.io",
    "read_solverstate": "caffeport.io",
    "write_solverstate": "caffeport.io",
    "upgrade_net": "caffeport.io",
    "upgrade_solver": "caffeport.io",
    "load_caffemodel_net": "caffeport.io",
    "Solver": "caffeport.solver",
    "get_solver": "caffeport.solver",
    "from_solver": "caffeport.optim",
}
_SUBMODULES = ("optim",)


def pycaffe_module() -> Any:
    """What ``import caffe`` resolves to inside trusted user Python layers when pycaffe is not installed
    (caffeport.compat); the layers package asks the package root rather than importing compat itself."""
    return import_module("caffeport.compat")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return import_module(f"caffeport.{name}")
    raise AttributeError(f"module 'caffeport' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
