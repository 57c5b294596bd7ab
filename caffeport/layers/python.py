"""Caffe's ``Python`` layer: user code with pycaffe's layer interface, inside a caffeport net.

As ``python_layer.hpp`` does, the layer imports ``python_param.module``, instantiates
``python_param.layer``, sets ``param_str`` and ``phase`` on the object, then calls
``setup(bottom, top)`` and ``reshape(bottom, top)`` once, and ``reshape`` + ``forward(bottom, top)``
on every forward and ``backward(top, propagate_down, bottom)`` on backward. ``bottom``/``top`` are
lists of blob objects with numpy ``data``/``diff`` arrays, ``reshape(*shape)``, ``shape``,
``count`` and ``num/channels/height/width``; ``self.blobs.add_blob(*shape)`` creates a parameter
blob that lives in the layer's ``blobs`` (saved to / loaded from caffemodels, trained by solvers).

Modules are found on ``sys.path`` (Caffe's PYTHONPATH), then in the net file's folder, the current
directory and ``BuildContext.extra['python_path']``. ``import caffe`` inside the module resolves to
:mod:`caffeport.compat` when no real pycaffe is installed, so ``caffe.Layer`` is
:class:`PythonLayerBase`.

Autograd wraps the user's ``backward``: top diffs come from autograd (zeros for unused tops),
bottom and parameter diffs start at zero for each call and what the user writes there becomes the
gradient (accumulated into ``param.grad`` as Caffe accumulates param diffs). The user code runs on
CPU numpy arrays.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from caffeport.errors import nearest
from caffeport.layers.base import Layer, LegacyShape, Shape, register


class PyBlob(LegacyShape):
    """pycaffe's Blob as seen by Python layers: numpy ``data`` and ``diff`` of one shape."""

    def __init__(self, shape: Sequence[int] = ()):
        self._data = np.zeros(tuple(int(s) for s in shape), dtype=np.float32)
        self._diff = np.zeros_like(self._data)

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @diff.setter
    def diff(self, value: Any) -> None:
        self._diff[...] = value

    def reshape(self, *shape: int) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"blob shape {shape} has a negative dimension")
        if shape != self._data.shape:
            self._data = np.zeros(shape, dtype=np.float32)
            self._diff = np.zeros(shape, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def count(self) -> int:
        return int(self._data.size)

    def __repr__(self) -> str:
        return f"<Blob {self.shape}>"


class _ParamPyBlob(PyBlob):
    """A parameter blob: ``data`` is a numpy view of an ``nn.Parameter`` (on CPU), so weights loaded
    from a caffemodel or updated by a solver are what the user code reads."""

    def __init__(self, param: nn.Parameter):
        self.param = param
        self._diff = np.zeros(tuple(param.shape), dtype=np.float32)

    @property
    def data(self) -> np.ndarray:
        t = self.param.detach()
        return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()

    @data.setter
    def data(self, value: Any) -> None:
        with torch.no_grad():
            self.param.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(self.param.shape))

    def reshape(self, *shape: int) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if shape != tuple(self.param.shape):
            with torch.no_grad():
                self.param.data = self.param.data.new_zeros(shape)
            self._diff = np.zeros(shape, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def count(self) -> int:
        return int(self.param.numel())


class BlobVec(list):
    """``self.blobs`` of a Python layer: a list of blobs with pycaffe's ``add_blob(*shape)``."""

    def __init__(self, owner: PythonLayer | None = None):
        super().__init__()
        self._owner = owner

    def add_blob(self, *shape: int) -> PyBlob:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        param = nn.Parameter(torch.zeros(tuple(int(s) for s in shape), dtype=torch.float32))
        if self._owner is not None:
            self._owner.blobs.append(param)
        blob = _ParamPyBlob(param)
        self.append(blob)
        return blob


class PythonLayerBase:
    """Base class of user Python layers (``caffe.Layer`` under :mod:`caffeport.compat`).

    Subclasses override ``setup``, ``reshape``, ``forward`` and ``backward``; ``param_str``,
    ``phase`` and ``blobs`` are set before ``setup`` is called."""

    param_str: str = ""
    phase: int = 1

    def __init__(self, *args: Any, **kwargs: Any):
        if "blobs" not in self.__dict__:
            self.blobs = BlobVec()

    def setup(self, bottom: list[PyBlob], top: list[PyBlob]) -> None:
        pass

    def reshape(self, bottom: list[PyBlob], top: list[PyBlob]) -> None:
        pass

    def forward(self, bottom: list[PyBlob], top: list[PyBlob]) -> None:
        pass

    def backward(self, top: list[PyBlob], propagate_down: list[bool], bottom: list[PyBlob]) -> None:
        pass


# What ``import caffe`` gives user modules when no real pycaffe is installed. The layer does not reach up
# into caffeport.compat: the package root (or compat itself) registers a factory with set_caffe_module.
_CAFFE_MODULE_FACTORY: Callable[[], ModuleType] | None = None


def set_caffe_module(factory: Callable[[], ModuleType] | None) -> None:
    """Register what ``import caffe`` resolves to inside user Python layers (pycaffe look-alike)."""
    global _CAFFE_MODULE_FACTORY
    _CAFFE_MODULE_FACTORY = factory


def _ensure_caffe_module() -> None:
    """Make ``import caffe`` work in user modules when pycaffe is not installed."""
    if "caffe" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("caffe")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        factory = _CAFFE_MODULE_FACTORY
        if factory is None:
            import caffeport

            factory = getattr(caffeport, "pycaffe_module", None)
        if factory is not None:
            sys.modules["caffe"] = factory()


# Built-in equivalents of well-known Python layers, keyed by (python_param.module, python_param.layer):
# a prototxt naming one of them gets caffeport's own layer class (no user code runs, no opt-in needed).
_EQUIVALENTS: dict[tuple[str, str], type[Layer]] = {}


def register_python_equivalent(module: str, layer: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: ``type: "Python"`` layers with this module/layer are built by the decorated class."""

    def deco(cls: type[Layer]) -> type[Layer]:
        _EQUIVALENTS[(module, layer)] = cls
        return cls

    return deco


def python_equivalent(param: Any) -> type[Layer] | None:
    """The built-in class standing in for this Python layer's module/layer, if any."""
    pp = param.python_param
    return _EQUIVALENTS.get((pp.module, pp.layer))


@contextlib.contextmanager
def _extra_path(dirs: Sequence[str]) -> Iterator[None]:
    added = [d for d in dirs if d and d not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


class _PythonFn(torch.autograd.Function):
    """Runs the user's forward; autograd calls the user's backward."""

    @staticmethod
    def forward(ctx, layer: PythonLayer, n_bottoms: int, *tensors: torch.Tensor):  # type: ignore[override]
        bottoms = tensors[:n_bottoms]
        ctx.layer = layer
        ctx.n_bottoms = n_bottoms
        ctx.devices = [b.device for b in bottoms]
        ctx.dtypes = [b.dtype for b in bottoms]
        ctx.save_for_backward(*bottoms)
        outs = layer._run_forward(bottoms)
        ctx.out_shapes = [tuple(o.shape) for o in outs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        layer: PythonLayer = ctx.layer
        n = ctx.n_bottoms
        bottoms = ctx.saved_tensors
        propagate = [bool(ctx.needs_input_grad[2 + i]) for i in range(n)]
        bdiffs, pdiffs = layer._run_backward(bottoms, list(grads), propagate)
        out: list[torch.Tensor | None] = [None, None]
        for i in range(n):
            if propagate[i]:
                out.append(torch.from_numpy(bdiffs[i]).to(device=ctx.devices[i], dtype=ctx.dtypes[i]))
            else:
                out.append(None)
        for p, d in zip(layer.blobs, pdiffs):
            out.append(torch.from_numpy(d).to(device=p.device, dtype=p.dtype) if p.requires_grad else None)
        return tuple(out)


@register("Python")
class PythonLayer(Layer):
    """A user-defined layer written against pycaffe's ``caffe.Layer`` interface (numpy in, numpy out).

    There is no PyTorch analogue: the user's ``forward``/``backward`` run on numpy copies of the
    tensors, inside one ``torch.autograd.Function``, so the gradient is whatever the user's
    ``backward`` writes (Caffe's semantics), not autograd's."""

    def __new__(cls, param: Any = None, bottom_shapes: Any = None, ctx: Any = None) -> Any:
        # A well-known Python layer with a built-in equivalent is built by that class instead (and then
        # Python's __init__ protocol skips PythonLayer.__init__: the returned object is not one).
        equivalent = python_equivalent(param) if param is not None else None
        if equivalent is not None:
            return equivalent(param, bottom_shapes, ctx)
        return super().__new__(cls)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        pp = self.param.python_param
        if not pp.module:
            raise self.error("python_param.module must be set")
        if not pp.layer:
            raise self.error("python_param.layer must be set")
        if not self.ctx.allow_python_layers:
            raise self.error(
                f"python_param.module '{pp.module}' (class '{pp.layer}') is user code and is not imported "
                "unless asked: pass allow_python_layers=True (CLI: --allow-python-layers) if you trust it")
        cls = self._import_class(pp.module, pp.layer)
        try:
            obj = cls(self.param)
        except TypeError:
            obj = cls()
        if not isinstance(getattr(obj, "blobs", None), BlobVec):
            obj.blobs = BlobVec(self)
        else:
            obj.blobs._owner = self
        obj.param_str = pp.param_str
        obj.phase = int(self.ctx.phase)
        self.obj = obj
        self._bottom = [PyBlob(s) for s in bottom_shapes]
        self._top = [PyBlob((0,)) for _ in self.param.top]
        self._call("setup", self._bottom, self._top)
        self._call("reshape", self._bottom, self._top)
        self._setup_key = [tuple(s) for s in bottom_shapes]
        self._setup_tops = [b.shape for b in self._top]

    # --- module loading ---------------------------------------------------------------------------
    def _search_dirs(self) -> list[str]:
        dirs = [str(self.ctx.root), os.getcwd()]
        extra = self.ctx.extra.get("python_path", ())
        if isinstance(extra, (str, os.PathLike)):
            extra = [extra]
        return dirs + [str(p) for p in extra]

    def _import_class(self, module: str, name: str) -> type:
        _ensure_caffe_module()
        try:
            with _extra_path(self._search_dirs()):
                mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise self.error(
                    f"python_param.module '{module}' not found on sys.path or in {self._search_dirs()}"
                ) from None
            raise self.error(f"importing python_param.module '{module}' failed: {e}") from e
        except Exception as e:  # the user's module raised while importing
            raise self.error(f"importing python_param.module '{module}' failed: {e!r}") from e
        cls = getattr(mod, name, None)
        if cls is None or not callable(cls):
            names = [k for k, v in vars(mod).items() if isinstance(v, type)]
            raise self.error(f"python_param.layer '{name}' is not a class of module '{module}'"
                             f"{nearest(name, names)}")
        return cls

    def _call(self, method: str, *args: Any) -> None:
        fn = getattr(self.obj, method, None)
        if fn is None:
            if method in ("setup", "forward", "reshape"):
                raise self.error(f"python layer class {type(self.obj).__name__} has no {method}() method")
            return
        try:
            fn(*args)
        except Exception as e:  # the user's own exception reaches the caller as itself (as in pycaffe)
            e.add_note(f"{self.ctx.source}: in {type(self.obj).__name__}.{method}() of Python layer "
                       f"'{self.name}'")
            raise

    # --- shapes / forward / backward ----------------------------------------------------------------
    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape] | None:
        if [tuple(s) for s in bottom_shapes] == self._setup_key:
            return list(self._setup_tops)
        for blob, s in zip(self._bottom, bottom_shapes):
            blob.reshape(*s)
        self._call("reshape", self._bottom, self._top)
        return [b.shape for b in self._top]

    def _run_forward(self, bottoms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for blob, t in zip(self._bottom, bottoms):
            blob.reshape(*t.shape)
            blob.data[...] = _np(t)
        self._call("reshape", self._bottom, self._top)
        self._call("forward", self._bottom, self._top)
        device = bottoms[0].device if bottoms else (self.blobs[0].device if len(self.blobs) else None)
        outs = []
        for b in self._top:
            t = torch.from_numpy(np.array(b.data, dtype=np.float32, copy=True))
            outs.append(t.to(device) if device is not None else t)
        return outs

    def _run_backward(self, bottoms: Sequence[torch.Tensor], grads: list[torch.Tensor | None],
                      propagate: list[bool]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        for blob, t in zip(self._bottom, bottoms):
            blob.reshape(*t.shape)
            blob.data[...] = _np(t)
            blob.diff[...] = 0
        for blob, g in zip(self._top, grads):
            if g is None:
                blob.diff[...] = 0
            else:
                blob.diff[...] = _np(g).reshape(blob.shape)
        for pb in self.obj.blobs:
            pb.diff[...] = 0
        self._call("backward", self._top, list(propagate), self._bottom)
        bdiffs = [np.array(b.diff, dtype=np.float32, copy=True) for b in self._bottom]
        pdiffs = [np.array(pb.diff, dtype=np.float32, copy=True) for pb in self.obj.blobs]
        return bdiffs, pdiffs

    def forward(self, *bottoms: torch.Tensor):
        params = list(self.blobs)
        needs = any(b.requires_grad for b in bottoms) or any(p.requires_grad for p in params)
        if torch.is_grad_enabled() and needs:
            outs = _PythonFn.apply(self, len(bottoms), *bottoms, *params)
        else:
            outs = tuple(self._run_forward(bottoms))
        if len(outs) == 1:
            return outs[0]
        return tuple(outs)
