"""The runtime net: a Caffe ``NetParameter`` + phase as a PyTorch module, behind pycaffe's model.

``Net`` is what pycaffe users know (``blobs``, ``params``, ``forward``, ``backward``, ``copy_from``,
``save``); ``Net.module`` is the plain ``torch.nn.Module`` (``NetModule``) for PyTorch users.

What Caffe does that a naive port would not:

- layers are filtered by phase/level/stage and multiply-consumed blobs get explicit ``Split`` layers
  (``caffeport.graph``), so blob names and diffs match pycaffe's;
- the net loss is ``sum(loss_weight * top)`` over every top with a non-zero loss weight (loss layers
  default to weight 1 on their first top); ``backward`` starts from those weights as top diffs;
- ``copy_from`` matches layers by *name* and leaves layers missing from the file at their filler
  values (how a renamed ``fc8`` gets a fresh layer when fine-tuning);
- ``lr_mult: 0`` blobs need no gradient (``requires_grad=False``) and named params are shared.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from caffeport.errors import CaffeportError, nearest
from caffeport.graph import filter_net, insert_splits, net_state
from caffeport.layers.base import TEST, TRAIN, BuildContext, Layer, LegacyShape, Shape, check_blob_elements, registry
from caffeport.proto import caffe_pb2

__all__ = ["Net", "NetModule", "Blob", "TRAIN", "TEST", "load_module"]

PathLike = str | os.PathLike


def _read_net(model: PathLike | caffe_pb2.NetParameter) -> tuple[caffe_pb2.NetParameter, str, Path]:
    from caffeport.io.prototxt import read_net

    if isinstance(model, caffe_pb2.NetParameter):
        msg = caffe_pb2.NetParameter()
        msg.CopyFrom(model)
        try:
            from caffeport.io.upgrade import upgrade_net

            msg = upgrade_net(msg) or msg
        except ImportError:
            pass
        return msg, msg.name or "<NetParameter>", Path.cwd()
    path = Path(model)
    if not path.exists():
        raise CaffeportError(f"net file not found: {path}")
    return read_net(path), str(path), path.resolve().parent


class _Plan:
    """One instantiated layer and its wiring."""

    __slots__ = ("layer", "bottoms", "tops", "loss_weights", "detach", "inplace")

    def __init__(self, layer: Layer, bottoms: list[str], tops: list[str], loss_weights: list[float],
                 detach: list[bool]):
        self.layer = layer
        self.bottoms = bottoms
        self.tops = tops
        self.loss_weights = loss_weights
        self.detach = detach
        self.inplace = layer.can_run_inplace and len(bottoms) == 1 and tops == bottoms


def exact_cuda_math() -> None:
    """Turn TF32 off for CUDA convolutions and matmuls (process-wide). cuDNN convolutions default to
    TF32 on Ampere and later GPUs (10 mantissa bits, ~1e-3 relative error); Caffe's are float32, so a
    Net placed on CUDA turns it off. Fast mode's bf16 autocast is unaffected."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class NetModule(nn.Module):
    """The net as a ``torch.nn.Module``.

    ``forward(*inputs, **named_inputs)`` takes the net inputs (tops of ``Input`` layers, in order, or
    by name) and returns a dict ``{output blob name: tensor}``. Data layers (Data, HDF5Data...) read
    their next batch unless their tops are passed by name. ``run`` returns every blob.
    """

    def __init__(self, plans: list[_Plan], input_names: list[str], output_names: list[str]):
        super().__init__()
        self.layers = nn.ModuleList([p.layer for p in plans])
        self._plans = plans
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.loss_tops = [(t, w) for p in plans for t, w in zip(p.tops, p.loss_weights) if w]

    def run(self, feeds: Mapping[str, torch.Tensor], end: int | None = None,
            start: int = 0, blobs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run layers ``start..end`` (indices) and return the blob table ``{name: tensor}``."""
        table: dict[str, torch.Tensor] = {} if blobs is None else blobs
        plans = self._plans[start:end]
        for plan in plans:
            layer = plan.layer
            if layer.is_input or (layer.is_data and all(t in feeds for t in plan.tops)):
                for t in plan.tops:
                    if t not in feeds:
                        raise CaffeportError(f"net input '{t}' was not given")
                    table[t] = feeds[t]
                continue
            if plan.inplace and not torch.is_grad_enabled():
                x = table[plan.bottoms[0]]
                if _private(x, table, feeds):
                    table[plan.tops[0]] = layer.forward_inplace(x)
                    continue
            ins = []
            for b, det in zip(plan.bottoms, plan.detach):
                x = table[b]
                ins.append(x.detach() if det else x)
            out = layer(*ins)
            if isinstance(out, torch.Tensor):
                out = (out,)
            for t, o in zip(plan.tops, out):
                table[t] = o
        return table

    def loss(self, table: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Caffe's net loss: sum over weighted tops of ``loss_weight * sum(top)``."""
        total = None
        for t, w in self.loss_tops:
            v = table[t].sum() * w
            total = v if total is None else total + v
        return total

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        table = self.run(feeds)
        return {name: table[name] for name in self.output_names}


def _private(x: torch.Tensor, table: Mapping[str, torch.Tensor], feeds: Mapping[str, torch.Tensor]) -> bool:
    """True when overwriting ``x`` can change no other blob, parameter or caller's tensor."""
    if x._base is not None or isinstance(x, nn.Parameter):
        return False
    if any(f is x for f in feeds.values()):
        return False
    return sum(1 for v in table.values() if v is x) == 1


class Blob(LegacyShape):
    """pycaffe's Blob: ``data`` and ``diff`` are numpy views of fixed buffers (on CPU; on another
    device they are copies). As in pycaffe, a view taken once stays live: later forwards, backwards
    and solver steps write into the same memory while the blob's shape is unchanged."""

    def __init__(self, net: Net, name: str):
        self._net = net
        self.name = name

    def _tensor(self) -> torch.Tensor:
        return self._net._value(self.name)

    @property
    def data(self) -> np.ndarray:
        return _as_numpy(self._net._expose(self.name))

    @data.setter
    def data(self, value: Any) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return _as_numpy(self._net._expose_diff(self.name))

    @diff.setter
    def diff(self, value: Any) -> None:
        self.diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._tensor().shape)

    @property
    def count(self) -> int:
        return int(self._tensor().numel())

    def reshape(self, *shape: int) -> None:
        """Reshape an input blob (as pycaffe's ``net.blobs['data'].reshape(...)``)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        self._net._reshape_input(self.name, tuple(int(s) for s in shape))

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, shape={self.shape})"


class ParamBlob:
    """One learnable blob of a layer: ``data`` and ``diff`` numpy views of the ``nn.Parameter``."""

    def __init__(self, param: nn.Parameter):
        self.param = param

    @property
    def data(self) -> np.ndarray:
        return _as_numpy(self.param)

    @data.setter
    def data(self, value: Any) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        p = self.param
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return _as_numpy(p.grad)

    @diff.setter
    def diff(self, value: Any) -> None:
        self.diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def count(self) -> int:
        return int(self.param.numel())

    def reshape(self, *shape: int) -> None:
        with torch.no_grad():
            self.param.data = self.param.data.new_zeros(shape)

    def __getattr__(self, name: str) -> Any:  # tensor attributes (grad, data_ptr, device...) of the parameter
        if name == "param":
            raise AttributeError(name)
        return getattr(self.param, name)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        args = [a.param if isinstance(a, ParamBlob) else a for a in args]
        kwargs = {k: v.param if isinstance(v, ParamBlob) else v for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"ParamBlob(shape={self.shape})"


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        return t.cpu().numpy()
    return t.numpy()


def _infer_top_shapes(layer: Layer, bottom_shapes: list[Shape]) -> list[Shape]:
    shapes = layer.top_shapes(bottom_shapes)
    if shapes is not None:
        return [tuple(int(d) for d in s) for s in shapes]
    # Run forward on placeholders: fake tensors first (no compute), real zeros when the layer needs
    # data (data-dependent shapes, .item()). Blobs that forward updates in place are restored.
    saved = [p.detach().clone() for p in layer.blobs if not p.requires_grad]
    try:
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                out = layer(*[torch.zeros(s) for s in bottom_shapes])
                if isinstance(out, torch.Tensor):
                    out = (out,)
                return [tuple(int(d) for d in o.shape) for o in out]
        except CaffeportError:
            raise
        except Exception:
            with torch.no_grad():
                out = layer(*[torch.zeros(s) for s in bottom_shapes])
            if isinstance(out, torch.Tensor):
                out = (out,)
            return [tuple(o.shape) for o in out]
    finally:
        with torch.no_grad():
            for p, s in zip([p for p in layer.blobs if not p.requires_grad], saved):
                p.copy_(s)


def build_plans(net: caffe_pb2.NetParameter, ctx: BuildContext,
                force_backward: bool = False) -> tuple[list[_Plan], dict[str, Shape]]:
    """Instantiate every layer of an already filtered and split net, inferring blob shapes."""
    reg = registry()
    missing = sorted({lp.type for lp in net.layer if lp.type not in reg})
    if missing:
        where = {t: [lp.name for lp in net.layer if lp.type == t] for t in missing}
        detail = "; ".join(f"{t} (layer{'s' if len(v) > 1 else ''} {', '.join(repr(n) for n in v[:5])}"
                           f"{', ...' if len(v) > 5 else ''}){nearest(t, reg)}" for t, v in where.items())
        raise CaffeportError(f"{ctx.source}: caffeport cannot run these layer types yet: {detail}")
    shapes: dict[str, Shape] = {}
    plans: list[_Plan] = []
    shared: dict[str, tuple[nn.Parameter, caffe_pb2.ParamSpec, str]] = {}
    for lp in net.layer:
        for b in lp.bottom:
            if b not in shapes:
                raise CaffeportError(
                    f"{ctx.source}: layer '{lp.name}' ({lp.type}): bottom '{b}' is produced by no "
                    f"earlier layer{nearest(b, shapes)}"
                )
        for t in lp.top:
            if t in shapes and t not in lp.bottom:
                raise CaffeportError(
                    f"{ctx.source}: layer '{lp.name}' ({lp.type}): top '{t}' is already produced by an "
                    "earlier layer (only in-place layers, with top == bottom, may reuse a blob name)"
                )
        bottom_shapes = [shapes[b] for b in lp.bottom]
        cls = reg[lp.type]
        layer = cls(lp, bottom_shapes, ctx)
        _apply_param_specs(layer, lp, shared, ctx, force_backward)
        tshapes = _infer_top_shapes(layer, bottom_shapes)
        if len(tshapes) < len(lp.top):
            raise CaffeportError(f"{ctx.source}: layer '{lp.name}' ({lp.type}) produced {len(tshapes)} "
                                 f"tops, the net names {len(lp.top)}")
        for t, s in zip(lp.top, tshapes):
            check_blob_elements(s, f"{ctx.source}: layer '{lp.name}' ({lp.type}) top '{t}'")
            shapes[t] = s
        n_top = len(lp.top)
        weights = [float(lp.loss_weight[j]) if j < len(lp.loss_weight) else
                   (1.0 if (cls.is_loss and j == 0 and not lp.loss_weight) else 0.0) for j in range(n_top)]
        detach = []
        for i in range(len(lp.bottom)):
            pd = lp.propagate_down[i] if i < len(lp.propagate_down) else True
            detach.append((not pd) or (i in cls.no_grad_bottoms) or not cls.has_backward)
        plans.append(_Plan(layer, list(lp.bottom), list(lp.top), weights, detach))
    return plans, shapes


def _apply_param_specs(layer: Layer, lp: caffe_pb2.LayerParameter,
                       shared: dict[str, tuple[nn.Parameter, caffe_pb2.ParamSpec, str]],
                       ctx: BuildContext, force_backward: bool = False) -> None:
    """lr_mult 0 -> no gradient (unless the net sets force_backward, which makes Caffe compute every
    param diff); named params shared between layers (Caffe's AppendParam)."""
    for i, spec in enumerate(lp.param):
        if i >= len(layer.blobs):
            break
        if spec.HasField("lr_mult") and spec.lr_mult == 0 and not force_backward:
            layer.blobs[i].requires_grad_(False)
        if spec.name:
            if spec.name not in shared:
                shared[spec.name] = (layer.blobs[i], spec, lp.name)
                continue
            owner, owner_spec, owner_layer = shared[spec.name]
            mine = layer.blobs[i]
            strict = spec.share_mode != caffe_pb2.ParamSpec.PERMISSIVE
            if (strict and owner.shape != mine.shape) or owner.numel() != mine.numel():
                raise CaffeportError(
                    f"{ctx.source}: layer '{lp.name}' shares param '{spec.name}' with layer '{owner_layer}' "
                    f"but the shapes differ: {tuple(mine.shape)} vs {tuple(owner.shape)}"
                )
            if owner.shape != mine.shape:
                raise CaffeportError(
                    f"{ctx.source}: layer '{lp.name}': PERMISSIVE sharing of '{spec.name}' between different "
                    "shapes of equal count is not supported"
                )
            if spec.HasField("lr_mult") and owner_spec.HasField("lr_mult") and spec.lr_mult != owner_spec.lr_mult:
                raise CaffeportError(f"{ctx.source}: layer '{lp.name}': shared param '{spec.name}' has "
                                     f"lr_mult {spec.lr_mult}, its owner '{owner_layer}' {owner_spec.lr_mult}")
            layer.blobs[i] = owner


class Net:
    """A Caffe net in PyTorch, with pycaffe's model.

    ``Net(model, weights=None, phase=TEST, level=0, stages=(), device=None)`` where ``model`` is a
    prototxt path (text or binary, legacy formats upgraded) or a ``NetParameter``.
    ``allow_python_layers=True`` lets ``type: "Python"`` layers import the module their prototxt names
    (user code; off by default, unlike pycaffe; built-in equivalents such as py-faster-rcnn's proposal
    layer always run).
    """

    def __init__(self, model: PathLike | caffe_pb2.NetParameter, weights: PathLike | None = None,
                 phase: int = TEST, *, level: int = 0, stages: Sequence[str] = (),
                 device: str | torch.device | None = None, root: PathLike | None = None,
                 allow_python_layers: bool | None = None, fast: bool = False):
        if phase not in (TRAIN, TEST):
            raise CaffeportError(f"phase must be caffeport.TRAIN ({TRAIN}) or caffeport.TEST ({TEST}), got {phase!r}")
        msg, source, folder = _read_net(model)
        self.source = source
        self.phase = phase
        state = net_state(phase, level, stages)
        self.net_param = filter_net(msg, state, source)
        split_net = insert_splits(self.net_param)
        self.ctx = BuildContext(phase=phase, root=Path(root) if root else folder, source=source)
        if allow_python_layers is not None:  # None: caffeport.layers.base.allow_python_layers() / the CLI flag
            self.ctx.allow_python_layers = bool(allow_python_layers)
        plans, shapes = build_plans(split_net, self.ctx, bool(msg.force_backward))
        self._plans = plans
        # Outputs: blobs still available at the end (Caffe's available_blobs, a std::set, so in sorted
        # name order): each layer consumes its bottoms, then makes its tops available (in place too).
        produced: list[str] = []
        available: dict[str, None] = {}
        for p in plans:
            for b in p.bottoms:
                available.pop(b, None)
            for t in p.tops:
                available[t] = None
                if t not in produced:
                    produced.append(t)
        outputs = sorted(available)
        inputs = [t for p in plans if p.layer.is_input for t in p.tops]
        self.module = NetModule(plans, inputs, outputs)
        self.force_backward = bool(msg.force_backward)
        self._device = torch.device("cpu")
        self._shapes = shapes
        # Blob storage (pycaffe's fixed memory): the tensor holding each blob's value / diff. Names in
        # _owned / _owned_diff hold a buffer a numpy view may have been taken of: layers write into
        # it (copy) instead of replacing it. Other blobs simply adopt their layer's output tensor.
        self._data: dict[str, torch.Tensor] = {t: torch.zeros(shapes[t]) for t in inputs}
        self._owned: set[str] = set(inputs)
        self._diffs: dict[str, torch.Tensor] = {}
        self._owned_diff: set[str] = set()
        self._records: dict[int, tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        self._table: dict[str, torch.Tensor] = {}
        self._callbacks: dict[str, list[Any]] = {"before_forward": [], "after_forward": [],
                                                  "before_backward": [], "after_backward": []}
        self._analyse_backward(bool(msg.force_backward))
        self.blobs: OrderedDict[str, Blob] = OrderedDict((n, Blob(self, n)) for n in produced)
        self._layer_dict: OrderedDict[str, Layer] = OrderedDict((p.layer.name, p.layer) for p in plans)
        self.params: OrderedDict[str, list[ParamBlob]] = OrderedDict(
            (p.layer.name, [ParamBlob(b) for b in p.layer.blobs]) for p in plans if len(p.layer.blobs) > 0
        )
        self.loss: float | None = None
        if device is not None:
            self.to(device)
        if weights is not None:
            self.copy_from(weights)  # one path, commas included (the comma list is the CLI's --weights)
        self._fast = None  # fast=True: caffeport.fast's checked folded/compiled module runs forward()
        if fast:
            from caffeport.fast import attach

            attach(self)

    def rebuilt(self, param: caffe_pb2.NetParameter,
                weights: PathLike | Mapping[str, Sequence[np.ndarray]] | None = None) -> Net:
        """A plain TEST-phase ``Net`` of ``param`` that resolves relative paths as this net does and
        names this net's file in its errors (the graph passes build their result with it); on this
        net's device."""
        new = Net(param, weights, phase=TEST, root=self.ctx.root, device=self._device)
        new.source = self.source
        return new

    # --- pycaffe's read-only views -----------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        return list(self.module.input_names)

    @property
    def outputs(self) -> list[str]:
        return list(self.module.output_names)

    @property
    def layers(self) -> list[Layer]:
        return [p.layer for p in self._plans]

    @property
    def layer_dict(self) -> OrderedDict[str, Layer]:
        return self._layer_dict

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        """pycaffe's ``blob_loss_weights``: every blob's loss weight (0 for most)."""
        w = self.loss_weights
        return OrderedDict((n, float(w.get(n, 0.0))) for n in self.blobs)

    @property
    def _layer_names(self) -> list[str]:
        return [p.layer.name for p in self._plans]

    layer_names = _layer_names

    @property
    def top_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((p.layer.name, list(p.tops)) for p in self._plans)

    @property
    def bottom_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((p.layer.name, list(p.bottoms)) for p in self._plans)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {t: w for t, w in self.module.loss_tops}

    def learnable_params(self) -> list[tuple[str, int, nn.Parameter, float, float]]:
        """(layer name, blob index, parameter, lr_mult, decay_mult) for every distinct param blob,
        in Caffe's order; shared blobs appear once (under their owner)."""
        seen: set[int] = set()
        out = []
        for p in self._plans:
            lp = p.layer.param
            for i, blob in enumerate(p.layer.blobs):
                if id(blob) in seen:
                    continue
                seen.add(id(blob))
                spec = lp.param[i] if i < len(lp.param) else caffe_pb2.ParamSpec()
                out.append((p.layer.name, i, blob, float(spec.lr_mult), float(spec.decay_mult)))
        return out

    # --- device ----------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> Net:
        self._device = torch.device(device)
        if self._device.type == "cuda":
            exact_cuda_math()
        self.module.to(self._device)
        self._data = {k: v.to(self._device) for k, v in self._data.items()}
        self._diffs = {k: v.to(self._device) for k, v in self._diffs.items()}
        self._records = {}
        self._table = {}
        return self

    # --- blob storage ----------------------------------------------------------------------------
    @property
    def _inputs(self) -> dict[str, torch.Tensor]:
        """The input blobs' buffers (tops of Input layers)."""
        return {n: self._value(n) for n in self.module.input_names}

    def _value(self, name: str) -> torch.Tensor:
        t = self._data.get(name)
        if t is None:
            if name not in self._shapes:
                raise KeyError(name)
            # Not computed yet: a zero blob of the inferred shape, as Caffe's freshly allocated blobs.
            t = torch.zeros(self._shapes[name], device=self._device)
            self._data[name] = t
            self._owned.add(name)
        return t

    def _expose(self, name: str) -> torch.Tensor:
        """The blob's buffer, made a fixed one that later writes go into (a view of it stays live)."""
        t = self._value(name)
        if name not in self._owned:
            t = t.detach().clone()
            self._data[name] = t
            self._owned.add(name)
        return t

    def _diff_value(self, name: str) -> torch.Tensor:
        shape = tuple(self._value(name).shape)
        d = self._diffs.get(name)
        if d is None or tuple(d.shape) != shape:
            d = torch.zeros(shape, device=self._device)
            w = self.loss_weights.get(name)
            if w:  # Caffe sets a loss top's diff to its loss weight once, at set-up
                d.fill_(w)
            self._diffs[name] = d
            self._owned_diff.add(name)
        return d

    def _expose_diff(self, name: str) -> torch.Tensor:
        d = self._diff_value(name)
        if name not in self._owned_diff:
            d = d.detach().clone()
            self._diffs[name] = d
            self._owned_diff.add(name)
        return d

    @staticmethod
    def _write(store: dict[str, torch.Tensor], owned: set[str], name: str, value: torch.Tensor) -> None:
        value = value.detach()
        if name in owned:
            buf = store[name]
            if buf.shape == value.shape and buf.device == value.device and buf.dtype == value.dtype:
                if buf.data_ptr() != value.data_ptr() or buf.stride() != value.stride():
                    buf.copy_(value)
                return
            value = value.clone()  # new shape: a new fixed buffer (views of the old shape go stale)
        store[name] = value

    def _store(self, name: str, value: torch.Tensor) -> None:
        self._write(self._data, self._owned, name, value)

    def _store_diff(self, name: str, value: torch.Tensor) -> None:
        self._write(self._diffs, self._owned_diff, name, value)

    def _analyse_backward(self, force_backward: bool) -> None:
        """Caffe's ``Net::Init`` backward analysis: which layers run backward and which bottoms get a
        diff (params with lr_mult > 0 or bottoms needing one; layers not under a loss are skipped
        unless ``force_backward``). A net without any loss is treated as under a loss everywhere
        (Caffe would run no backward there; backward() on a deploy net is what users ask for)."""
        plans = self._plans
        blob_need: dict[str, bool] = {}
        need = []
        for p in plans:
            n = any(p2.requires_grad for p2 in p.layer.blobs)
            for b, det in zip(p.bottoms, p.detach):
                n = n or (blob_need.get(b, False) and not det)
            if force_backward and not p.layer.is_input:
                n = n or any(not det for det in p.detach) or len(p.layer.blobs) > 0
            need.append(n)
            for t in p.tops:
                blob_need[t] = blob_need.get(t, False) or n
        has_loss = any(w for p in plans for w in p.loss_weights)
        if not force_backward and has_loss:
            under: set[str] = set()
            for i in range(len(plans) - 1, -1, -1):
                p = plans[i]
                contributes = any(w for w in p.loss_weights) or any(t in under for t in p.tops)
                if not contributes:
                    need[i] = False
                else:
                    under.update(p.bottoms)
        blob_need = {}
        self._bottom_need: list[list[bool]] = []
        for i, p in enumerate(plans):
            bn = [need[i] and not det and (force_backward or blob_need.get(b, False))
                  for b, det in zip(p.bottoms, p.detach)]
            self._bottom_need.append(bn)
            for t in p.tops:
                blob_need[t] = blob_need.get(t, False) or need[i]
        self._layer_need = need
        # Blobs an in-place layer at index >= i writes: a recorded bottom aliasing such a buffer is cloned.
        later: set[str] = set()
        self._inplace_after: list[frozenset[str]] = [frozenset()] * len(plans)
        for i in range(len(plans) - 1, -1, -1):
            later |= {t for t in plans[i].tops if t in plans[i].bottoms}
            self._inplace_after[i] = frozenset(later)

    # --- forward / backward ----------------------------------------------------------------------
    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(self._layer_need) and (
            self.phase == TRAIN or self.force_backward or bool(self.module.loss_tops)
        )

    def _feeds(self, kwargs: Mapping[str, Any]) -> set[str]:
        """Write ``name=array`` inputs into their blobs; returns the data-layer tops fed this way."""
        fed: set[str] = set()
        for name, value in kwargs.items():
            if name not in self._shapes:
                raise CaffeportError(f"{self.source}: forward() got '{name}', which is not a blob of this net"
                                     f"{nearest(name, self.blobs)} (inputs: {', '.join(self.inputs) or 'none'})")
            t = (torch.tensor(np.asarray(value, dtype=np.float32)) if not isinstance(value, torch.Tensor)
                 else value.detach().to(torch.float32)).to(self._device)
            if name not in self.module.input_names:
                fed.add(name)  # feeding a data layer's top directly
            buf = self._value(name)
            if tuple(buf.shape) != tuple(t.shape) and name in self.module.input_names:
                self._reshape_input(name, tuple(t.shape))
            self._store(name, t)
        return fed

    def _layer_index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        names = self._layer_names
        if name not in names:
            raise CaffeportError(f"{self.source}: no layer named '{name}'{nearest(name, names)}")
        return names.index(name)

    def _run_layers(self, start: int, end: int, record: bool, write: bool, fed: set[str] = frozenset(),
                    ) -> dict[int, tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]]:
        """Caffe's ``ForwardFromTo(start, end)`` (inclusive): each layer reads its bottoms' blobs and
        writes its tops' blobs. ``record`` keeps, per layer, the (bottom leaves, tops) graph that
        backward runs layer by layer; ``write=False`` (re-running for a backward) leaves the blobs
        untouched and takes data layers' tops as they are."""
        records: dict[int, tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        local: dict[str, torch.Tensor] = {}
        before, after = (self._callbacks["before_forward"], self._callbacks["after_forward"]) if write else ((), ())
        for i in range(start, end + 1):
            plan = self._plans[i]
            layer = plan.layer
            for cb in before:
                cb(i)
            if layer.is_input or (layer.is_data and (not write or all(t in fed for t in plan.tops))):
                for cb in after:
                    cb(i)
                continue
            need = record and self._layer_need[i]
            if write and not need and plan.inplace and plan.bottoms[0] not in self._owned:
                x = self._value(plan.bottoms[0])
                if _private(x, self._data, {}):  # nothing else holds it: overwrite it (no copy)
                    self._data[plan.tops[0]] = layer.forward_inplace(x)
                    for cb in after:
                        cb(i)
                    continue
            ins = []
            for k, b in enumerate(plan.bottoms):
                x = local[b] if b in local else self._value(b)
                if need:
                    if write and b in self._owned and b in self._inplace_after[i]:
                        x = x.clone()  # the buffer is overwritten later in this pass
                    x = x.detach().requires_grad_(self._bottom_need[i][k])
                ins.append(x)
            try:
                with torch.set_grad_enabled(need):
                    out = layer(*ins)
            except Exception as e:  # the layer's own exception, with where it happened
                if not isinstance(e, CaffeportError) and hasattr(e, "add_note"):
                    e.add_note(f"in layer '{layer.name}' ({plan.layer.param.type}) of {self.source}")
                raise
            if isinstance(out, torch.Tensor):
                out = (out,)
            if need:
                records[i] = (ins, tuple(out))
            for t, o in zip(plan.tops, out):
                if write:
                    self._store(t, o)
                else:
                    local[t] = o.detach()
            for cb in after:
                cb(i)
        return records

    def forward(self, blobs: Iterable[str] | None = None, start: str | None = None, end: str | None = None,
                **kwargs: Any) -> dict[str, np.ndarray]:
        """Run the net (pycaffe's ``forward``): inputs by name, returns ``{output: ndarray}``
        (plus any extra ``blobs`` asked for). ``start``/``end`` are layer names; layers
        ``start..end`` (inclusive) run, reading their bottoms from the blobs as they are now."""
        if self._fast is not None:
            return self._fast.net_forward(self, blobs, start, end, kwargs)
        fed = self._feeds(kwargs)
        s = self._layer_index(start, 0)
        e = self._layer_index(end, len(self._plans) - 1)
        record = self._needs_grad()
        with torch.set_grad_enabled(record):
            recs = self._run_layers(s, e, record, True, fed)
        for i in range(s, e + 1):
            if i in recs:
                self._records[i] = recs[i]
            else:
                self._records.pop(i, None)
        total = None
        for i in range(s, e + 1):
            for t, w in zip(self._plans[i].tops, self._plans[i].loss_weights):
                if w:
                    v = float(self._value(t).sum()) * w
                    total = v if total is None else total + v
        self.loss = total
        outs = list(self.outputs) if end is None else list(self._plans[e].tops)
        outs += [b for b in (blobs or []) if b not in outs]
        return {name: self.blobs[name].data for name in outs}

    def backward(self, diffs: Iterable[str] | None = None, start: str | None = None, end: str | None = None,
                 **kwargs: Any) -> dict[str, np.ndarray]:
        """Backpropagate (pycaffe's ``backward``, Caffe's ``BackwardFromTo``): layers ``start`` down to
        ``end`` (names, inclusive; default all), each from its tops' diffs as they are now (loss tops
        hold their loss weight, outputs what the caller set) into its bottoms' diffs (overwritten) and
        its param diffs (accumulated). Output diffs may also be given by name. Returns the input blobs'
        diffs (the bottoms of ``end`` when given) plus any ``diffs`` asked for.
        Layers recorded by the last forward use that graph; others are re-run from the blobs."""
        if self._fast is not None:
            raise CaffeportError(f"{self.source}: a fast Net (fast=True) is inference-only: no backward")
        for name, value in kwargs.items():
            if name not in self._shapes:
                raise CaffeportError(f"{self.source}: backward() got '{name}', which is not a blob of this net"
                                     f"{nearest(name, self.blobs)} (outputs: {', '.join(self.outputs)})")
            d = torch.tensor(np.asarray(value, dtype=np.float32)).to(self._device)
            self._store_diff(name, d.reshape(self._value(name).shape))
        s = self._layer_index(start, len(self._plans) - 1)
        e = self._layer_index(end, 0)
        recs = self._records
        wanted = [i for i in range(e, s + 1) if self._layer_need[i] and not self._plans[i].layer.is_input
                  and not (self._plans[i].layer.is_data and not self._plans[i].bottoms)]
        if any(i not in recs for i in wanted):
            with torch.enable_grad():
                recs = self._run_layers(e, s, True, False)
        before, after = self._callbacks["before_backward"], self._callbacks["after_backward"]
        for i in range(s, e - 1, -1):
            for cb in before:
                cb(i)
            rec = recs.get(i) if self._layer_need[i] else None
            if rec is not None:
                self._backward_layer(i, rec)
            for cb in after:
                cb(i)
        names = list(self.inputs) if end is None else list(self._plans[e].bottoms)
        names += [d for d in (diffs or []) if d not in names]
        return {n: self.blobs[n].diff for n in names}

    def _backward_layer(self, i: int, rec: tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]) -> None:
        plan = self._plans[i]
        ins, outs = rec
        tensors, grads = [], []
        for t, o in zip(plan.tops, outs):
            if o.requires_grad:
                tensors.append(o)
                grads.append(self._diff_value(t).reshape(o.shape))
        targets: list[torch.Tensor] = [x for x in ins if x.requires_grad]
        seen: set[int] = set()
        for prm in plan.layer.blobs:
            if prm.requires_grad and id(prm) not in seen:
                seen.add(id(prm))
                targets.append(prm)
        for x in ins:
            x.grad = None
        if tensors and targets:
            try:
                torch.autograd.backward(tensors, grads, inputs=targets, retain_graph=True)
            except Exception as e:
                if not isinstance(e, CaffeportError) and hasattr(e, "add_note"):
                    e.add_note(f"in the backward of layer '{plan.layer.name}' ({plan.layer.param.type}) "
                               f"of {self.source}")
                raise
        for b, x in zip(plan.bottoms, ins):
            if x.requires_grad:
                self._store_diff(b, x.grad if x.grad is not None else torch.zeros_like(x))

    def forward_backward(
        self, feeds: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """One training pass as Caffe's ``ForwardBackward``: forward (data layers read their next
        batch), ``backward`` of the weighted loss into the param grads. Returns (loss, blob table).
        The whole-graph fast path; blobs and diffs a numpy view was taken of are updated too."""
        watched = [n for n in self._owned_diff]
        with torch.enable_grad():
            table = self.module.run(dict(feeds or self._inputs))
            for n in watched:
                t = table.get(n)
                if t is not None and t.requires_grad and not t.is_leaf:
                    t.retain_grad()
            loss = self.module.loss(table)
            if loss is not None and loss.requires_grad:
                loss.backward()
        self._table = table
        for n, t in table.items():
            self._store(n, t)
        for n in watched:
            t = table.get(n)
            if t is not None and t.grad is not None:
                self._store_diff(n, t.grad)
        self._records = {}
        self.loss = float(loss.detach()) if loss is not None else 0.0
        return self.loss, table

    def clear_param_diffs(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def add_callback(self, when: str, fn: Any) -> None:
        """pycaffe's ``before_forward``/``after_forward``/``before_backward``/``after_backward``:
        ``fn(layer_index)`` around each layer of ``forward()``/``backward()``."""
        self._callbacks[when].append(fn)

    def before_forward(self, fn: Any) -> None:
        self.add_callback("before_forward", fn)

    def after_forward(self, fn: Any) -> None:
        self.add_callback("after_forward", fn)

    def before_backward(self, fn: Any) -> None:
        self.add_callback("before_backward", fn)

    def after_backward(self, fn: Any) -> None:
        self.add_callback("after_backward", fn)

    def reshape(self) -> None:
        """Propagate new input shapes through the net (Caffe's ``Net::Reshape``): blob shapes are
        recomputed without running data layers or advancing any layer state; blobs whose shape
        changed are reset to zeros."""
        shapes: dict[str, Shape] = {}
        for plan in self._plans:
            layer = plan.layer
            if layer.is_input:
                tops = [tuple(self._value(t).shape) for t in plan.tops]
            elif layer.is_data:
                tops = layer.top_shapes([]) or [self._shapes[t] for t in plan.tops]
            else:
                tops = _infer_top_shapes(layer, [shapes[b] for b in plan.bottoms])
            for t, s in zip(plan.tops, tops):
                shapes[t] = tuple(int(d) for d in s)
        self._shapes = shapes
        for n in list(self._data):
            if tuple(self._data[n].shape) != shapes.get(n):
                del self._data[n]
                self._owned.discard(n)
        self._records = {}
        self._table = {}

    def _reshape_input(self, name: str, shape: tuple[int, ...]) -> None:
        """``net.blobs[name].reshape(...)``: any blob, as pycaffe's (a layer's next forward gives its tops
        the shape it computes); the new memory is zeros."""
        if name not in self._shapes:
            raise CaffeportError(f"{self.source}: no blob named '{name}'{nearest(name, self.blobs)}")
        if tuple(self._value(name).shape) != shape:
            self._data[name] = torch.zeros(shape, device=self._device)
            self._owned.add(name)
            self._shapes[name] = shape

    def _blob_tensor(self, name: str) -> torch.Tensor:
        return self._value(name)

    def _blob_diff(self, name: str) -> np.ndarray:
        return _as_numpy(self._expose_diff(name))

    # --- weights ---------------------------------------------------------------------------------
    def copy_from(self, weights: PathLike | Mapping[str, Sequence[np.ndarray]]) -> list[str]:
        """Copy blobs by layer name from a .caffemodel (binary or HDF5) or a ``{layer: [arrays]}``
        dict, as Caffe's ``CopyTrainedLayersFrom``: layers absent from the file keep their current
        values, layers absent from the net are ignored, shape mismatches are errors.
        Returns the names of the layers that were copied."""
        if isinstance(weights, Mapping):
            blobs, src = weights, "<weights>"
        else:
            from caffeport.io import load_caffemodel

            blobs, src = load_caffemodel(weights), str(weights)
        copied = []
        for name, layer in self._layer_dict.items():
            arrays = blobs.get(name)
            if arrays is None or (len(arrays) == 0 and len(layer.blobs) == 0):
                continue
            layer.load_blobs(list(arrays), source=src)
            copied.append(name)
        return copied

    def state_blobs(self) -> OrderedDict[str, list[np.ndarray]]:
        """``{layer name: [numpy blobs]}`` for every layer with blobs (what a caffemodel holds)."""
        return OrderedDict((p.layer.name, p.layer.dump_blobs()) for p in self._plans if len(p.layer.blobs))

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The filtered net with every layer's blobs, as Caffe's ``Net::ToProto`` writes a caffemodel."""
        from caffeport.io.blobs import array_to_blobproto

        out = caffe_pb2.NetParameter()
        out.CopyFrom(self.net_param)
        del out.layer[:]
        for p in self._plans:
            lp = out.layer.add()
            lp.CopyFrom(p.layer.param)
            del lp.blobs[:]
            for arr in p.layer.dump_blobs():
                lp.blobs.add().CopyFrom(array_to_blobproto(arr))
        return out

    def save(self, path: PathLike) -> None:
        """Write the net with its weights as a binary .caffemodel (``.h5``: Caffe's HDF5 layout),
        atomically: temp file, then rename."""
        from caffeport.io import save_caffemodel
        from caffeport.io.blobs import atomic_write, encode_net_with_blobs

        if str(path).lower().endswith((".h5", ".hdf5")):
            save_caffemodel(self.state_blobs(), path)
            return
        layers = caffe_pb2.NetParameter()
        layers.CopyFrom(self.net_param)
        del layers.layer[:]
        for p in self._plans:
            layers.layer.add().CopyFrom(p.layer.param)
        atomic_write(path, encode_net_with_blobs(layers, [p.layer.dump_blobs() for p in self._plans]))

    def layer_by_name(self, name: str) -> Layer:
        if name not in self._layer_dict:
            raise CaffeportError(f"{self.source}: no layer named '{name}'{nearest(name, self._layer_dict)}")
        return self._layer_dict[name]

    def __repr__(self) -> str:
        return f"Net({self.source!r}, phase={'TRAIN' if self.phase == TRAIN else 'TEST'}, layers={len(self._plans)})"


def load_module(model: PathLike, weights: PathLike | None = None, device: str | None = None, *,
                allow_python_layers: bool | None = None, fast: bool = False) -> NetModule:
    """One line from a legacy deploy net + caffemodel to an eval-mode ``torch.nn.Module``
    (``fast=True``: the checked fast module of ``caffeport.fast``, same call and outputs)."""
    net = Net(model, weights, phase=TEST, device=device, allow_python_layers=allow_python_layers)
    if fast:
        from caffeport.fast import fast_module

        return fast_module(net)  # type: ignore[return-value]
    return net.module.eval()
