"""The layer contract and the type registry.

Each Caffe layer type is one :class:`Layer` subclass, registered once by its Caffe type string::

    @register("ReLU")
    class ReLU(Layer):
        def forward(self, x):
            ...

A layer is a ``torch.nn.Module``. The net builds it from its ``LayerParameter`` and the shapes of its
bottoms (Caffe's ``LayerSetUp`` + ``Reshape``), then calls ``forward(*bottom_tensors)`` which returns
one tensor or a tuple of tensors, one per top. Backward is torch autograd; where Caffe's gradient
differs from autograd's (ties in MAX, sub-gradients at 0...) the layer uses a custom
``torch.autograd.Function`` so that the numbers are Caffe's.

Parameter blobs live in ``self.blobs`` (an ``nn.ParameterList``) in Caffe's order and with Caffe's
shapes (e.g. InnerProduct weight ``(N, K)``), so that ``.caffemodel`` files map one to one.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

Shape = tuple[int, ...]
TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

_REGISTRY: dict[str, type[Layer]] = {}


def register(*type_names: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: register a Layer subclass under one or more Caffe type strings."""

    def deco(cls: type[Layer]) -> type[Layer]:
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise RuntimeError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        if not getattr(cls, "type_name", None):
            cls.type_name = type_names[0]
        return cls

    return deco


def _load_families() -> None:
    # Importing the family modules fills the registry.
    import importlib

    for mod in ("input", "common", "neuron", "vision", "loss", "recurrent", "data", "python", "proposal", "detection",
                "forks"):
        try:
            importlib.import_module(f"caffeport.layers.{mod}")
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name != f"caffeport.layers.{mod}":
                raise


def registry() -> dict[str, type[Layer]]:
    """Caffe type string -> Layer class, for every type caffeport can run."""
    if not _REGISTRY.get("__loaded__"):
        _load_families()
        _REGISTRY["__loaded__"] = Layer  # sentinel
    return {k: v for k, v in _REGISTRY.items() if k != "__loaded__"}


def layer_class(type_name: str) -> type[Layer] | None:
    return registry().get(type_name)


# Trust in user code: Python layers import and run the module their prototxt names only when the
# caller opted in (Net(..., allow_python_layers=True), CLI --allow-python-layers, caffeport.compat).
_ALLOW_PYTHON_LAYERS: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_python_layers", default=False)
ALLOW_PYTHON_ENV = "CAFFEPORT_ALLOW_PYTHON_LAYERS"  # "1": set by the CLI flag so spawned workers inherit it


def python_layers_allowed() -> bool:
    """Whether nets built now may import user Python layer modules (default: no)."""
    return _ALLOW_PYTHON_LAYERS.get() or os.environ.get(ALLOW_PYTHON_ENV) == "1"


@contextlib.contextmanager
def allow_python_layers(allow: bool = True) -> Iterator[None]:
    """Within the block, nets built without an explicit ``allow_python_layers`` use ``allow``."""
    token = _ALLOW_PYTHON_LAYERS.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_PYTHON_LAYERS.reset(token)


def check_blob_elements(shape: Sequence[int], what: str) -> int:
    """Element count of ``shape`` in exact integers; CaffeportError (``what`` names the file/layer/blob)
    for a negative dimension or more than ``CAFFEPORT_MAX_BLOB_ELEMENTS`` (default 2^31: 8 GiB of
    float32), so that ``num_output: 2000000000`` fails naming the layer instead of with MemoryError."""
    from caffeport.io.safe import element_count

    return element_count(shape, what)


@dataclass
class BuildContext:
    """What a layer may need from the net being built, beyond its own LayerParameter."""

    phase: int = TEST
    root: Path = field(default_factory=Path.cwd)  # folder that relative paths in the net resolve against
    source: str = "<net>"  # the net file's name, for error messages
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. Python layer search paths
    # May Python layers import the module their python_param names? (built-in equivalents always run)
    allow_python_layers: bool = field(default_factory=python_layers_allowed)

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p


class Layer(nn.Module):
    """Base class of every Caffe layer.

    Subclasses override:

    - ``setup(bottom_shapes)``: read ``self.param`` (the ``LayerParameter``), validate it (raise
      ``self.error(...)``), and create parameter blobs with ``self.add_blob(shape, filler)``.
    - ``forward(*bottoms)``: tensors in, tensor or tuple of tensors out (one per top).
    - ``top_shapes(bottom_shapes)``: optional; when it returns None the net infers the top shapes by
      running ``forward`` on zeros.

    Class attributes: ``is_loss`` (Caffe's LossLayer: top 0 gets loss_weight 1 by default),
    ``min_bottoms``/``max_bottoms``/``min_tops``/``max_tops`` (None = unchecked),
    ``has_backward`` (False for Accuracy/ArgMax/Threshold: Caffe has no gradient),
    ``is_data`` (a data-source layer: no bottoms, produces batches).
    """

    type_name: ClassVar[str] = ""
    is_loss: ClassVar[bool] = False
    is_data: ClassVar[bool] = False
    is_input: ClassVar[bool] = False  # Input: tops are fed by the caller (pycaffe's net.inputs)
    has_backward: ClassVar[bool] = True
    min_bottoms: ClassVar[int | None] = None
    max_bottoms: ClassVar[int | None] = None
    min_tops: ClassVar[int | None] = None
    max_tops: ClassVar[int | None] = None
    # Bottom indices that can never receive a gradient (labels, indices, selectors).
    no_grad_bottoms: ClassVar[tuple[int, ...]] = ()
    # The layer offers ``forward_inplace(x)``, which the net uses for in-place layers (top == bottom)
    # when no gradient is recorded and nothing else holds the bottom's storage (saves a copy).
    can_run_inplace: ClassVar[bool] = False

    def __init__(self, param: caffe_pb2.LayerParameter, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        super().__init__()
        self.param = param
        self.name = param.name
        self.ctx = ctx
        self.phase = ctx.phase
        self.blobs = nn.ParameterList()
        self._check_counts(len(bottom_shapes), len(param.top))
        self.setup([tuple(int(d) for d in s) for s in bottom_shapes])

    # --- to override -------------------------------------------------------------------------
    def setup(self, bottom_shapes: list[Shape]) -> None:
        """Read params, validate, create blobs. Default: nothing."""

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape] | None:
        """Top shapes for these bottom shapes, or None to infer them by running forward."""
        return None

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrite ``x`` with the top (only when ``can_run_inplace``)."""
        raise NotImplementedError

    # Optional: ``forward_low_precision(*bottoms, dtype)``, the layer's forward with its matrix
    # products in ``dtype`` (bf16) and float32 tops, for eager CPU fast training; layers without it
    # run their ``forward`` under autocast there (see caffeport.fast_train).

    # --- helpers ---------------------------------------------------------------------------------
    def error(self, message: str) -> CaffeportError:
        """An error naming this layer and the net file; ``raise self.error("...")``."""
        return CaffeportError(f"{self.ctx.source}: layer '{self.name}' ({self.param.type}): {message}")

    def add_blob(self, shape: Sequence[int], filler: Any | None = None, requires_grad: bool = True) -> nn.Parameter:
        """Append a parameter blob of Caffe shape ``shape``, initialised by a FillerParameter."""
        from caffeport.fillers import fill

        check_blob_elements(shape, f"{self.ctx.source}: layer '{self.name}' ({self.param.type}) blob {len(self.blobs)}")
        try:
            data = fill(tuple(int(s) for s in shape), filler)
        except CaffeportError as e:  # e.g. an unknown filler type: say which layer asked for it
            raise self.error(str(e)) from None
        p = nn.Parameter(data, requires_grad=requires_grad)
        self.blobs.append(p)
        return p

    def _check_counts(self, n_bottom: int, n_top: int) -> None:
        def bad(what: str, n: int, lo: int | None, hi: int | None) -> None:
            if (lo is not None and n < lo) or (hi is not None and n > hi):
                want = f"{lo}" if lo == hi else f"{lo if lo is not None else 0}..{hi if hi is not None else 'any'}"
                raise CaffeportError(
                    f"{self.ctx.source}: layer '{self.param.name}' ({self.param.type}) has {n} {what}s, "
                    f"Caffe expects {want}"
                )

        bad("bottom", n_bottom, self.min_bottoms, self.max_bottoms)
        bad("top", n_top, self.min_tops, self.max_tops)

    # --- weights <-> Caffe blobs -----------------------------------------------------------------
    def load_blobs(self, arrays: Sequence[np.ndarray], source: str = "<weights>") -> None:
        """Copy Caffe blobs into this layer (``CopyTrainedLayersFrom``): count and shapes must match.

        Shapes match as Caffe's ``Blob::ShapeEquals`` does: legacy 4-D blobs are aligned from the end
        (an InnerProduct weight stored as (1, 1, N, K) fits a (N, K) blob).
        """
        if len(arrays) != len(self.blobs):
            raise CaffeportError(
                f"{source}: layer '{self.name}' ({self.param.type}) has {len(arrays)} blobs in the weights, "
                f"the net expects {len(self.blobs)}"
            )
        for i, (arr, p) in enumerate(zip(arrays, self.blobs)):
            want = tuple(p.shape)
            got = tuple(arr.shape)
            if got != want and not legacy_shape_equal(got, want):
                raise CaffeportError(
                    f"{source}: layer '{self.name}' ({self.param.type}) blob {i}: weights have shape "
                    f"{got}, the net expects {want}"
                )
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(want))

    def dump_blobs(self) -> list[np.ndarray]:
        """The parameter blobs as numpy arrays with Caffe shapes."""
        return [p.detach().cpu().numpy().copy() for p in self.blobs]


def legacy_shape_equal(legacy: Shape, shape: Shape) -> bool:
    """Caffe's ShapeEquals for a legacy num/channels/height/width blob: compare from the end, the
    extra leading dims of the 4-D legacy shape must be 1."""
    if len(legacy) > 4 or len(shape) > 4:
        return False
    leg = (1,) * (4 - len(legacy)) + tuple(legacy)
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    return leg == padded


def blob_shape(bs: caffe_pb2.BlobShape) -> Shape:
    return tuple(int(d) for d in bs.dim)


class _NoGradCtx:
    """Stands in for autograd's ctx when a Function's forward runs without autograd."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


def run_function(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` when a gradient can flow, else its plain forward (no autograd node), so
    inference, tracing and export see ordinary torch ops. Layers whose Caffe gradient differs from
    autograd's use this for their custom Functions."""
    needs = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if needs and not torch.jit.is_tracing():
        return fn.apply(*args)
    return fn.forward(_NoGradCtx(), *args)


class LegacyShape:
    """pycaffe's legacy 4-D accessors (num, channels, height, width) over ``self.shape``: axes a
    shorter shape lacks read 1, as Caffe's ``Blob::LegacyShape`` (``(10, 4)``: num 10, channels 4,
    height 1, width 1)."""

    shape: tuple[int, ...]

    def _legacy(self, i: int) -> int:
        s = tuple(self.shape)
        if len(s) > 4:
            raise ValueError(f"legacy accessors need at most 4 axes, blob has shape {s}")
        return (s + (1,) * (4 - len(s)))[i]

    @property
    def num(self) -> int:
        return self._legacy(0)

    @property
    def channels(self) -> int:
        return self._legacy(1)

    @property
    def height(self) -> int:
        return self._legacy(2)

    @property
    def width(self) -> int:
        return self._legacy(3)
