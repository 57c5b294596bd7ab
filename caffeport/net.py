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
from caffeport.layers.base import TEST, TRAIN, BuildContext, Layer, LegacyShape, Shape, registry
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
    """pycaffe's Blob: ``data`` and ``diff`` as numpy arrays that share memory with the tensors
    (on CPU; on another device they are copies)."""

    def __init__(self, net: Net, name: str):
        self._net = net
        self.name = name

    # The tensor currently holding this blob's value.
    def _tensor(self) -> torch.Tensor:
        return self._net._blob_tensor(self.name)

    @property
    def data(self) -> np.ndarray:
        return _as_numpy(self._tensor())

    @data.setter
    def data(self, value: Any) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._net._blob_diff(self.name)

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
        self._inputs: dict[str, torch.Tensor] = {t: torch.zeros(shapes[t]) for t in inputs}
        self._table: dict[str, torch.Tensor] = {}
        self._shapes = shapes
        self._diff_bufs: dict[str, torch.Tensor] = {}
        self._graph_ready = False
        self.blobs: OrderedDict[str, Blob] = OrderedDict((n, Blob(self, n)) for n in produced)
        self.layer_dict: OrderedDict[str, Layer] = OrderedDict((p.layer.name, p.layer) for p in plans)
        self.params: OrderedDict[str, list[ParamBlob]] = OrderedDict(
            (p.layer.name, [ParamBlob(b) for b in p.layer.blobs]) for p in plans if len(p.layer.blobs) > 0
        )
        self.loss: float | None = None
        if device is not None:
            self.to(device)
        if weights is not None:
            for w in str(weights).split(",") if isinstance(weights, str) else [weights]:
                self.copy_from(w)
        self._fast = None  # fast=True: caffeport.fast's checked folded/compiled module runs forward()
        if fast:
            from caffeport.fast import attach

            attach(self)

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
        self.module.to(self._device)
        self._inputs = {k: v.to(self._device) for k, v in self._inputs.items()}
        self._table = {}
        return self

    # --- forward / backward ----------------------------------------------------------------------
    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (
            self.phase == TRAIN or self.force_backward or bool(self.module.loss_tops)
        )

    def _feeds(self, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        for name, value in kwargs.items():
            if name not in self._inputs and name not in self._shapes:
                raise CaffeportError(f"{self.source}: '{name}' is not a blob of this net{nearest(name, self.blobs)}")
            t = torch.as_tensor(np.asarray(value, dtype=np.float32) if not isinstance(value, torch.Tensor)
                                else value, dtype=torch.float32)
            if name in self._inputs:
                buf = self._inputs[name]
                if tuple(buf.shape) != tuple(t.shape):
                    self._inputs[name] = t.to(self._device).clone()
                else:
                    buf.copy_(t)
            else:  # feeding a data layer's top directly
                self._inputs[name] = t.to(self._device)
        feeds = {}
        grad = self._needs_grad() and self.force_backward
        for name, buf in self._inputs.items():
            feeds[name] = buf.detach().requires_grad_(True) if grad else buf
        return feeds

    def _layer_index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        names = self._layer_names
        if name not in names:
            raise CaffeportError(f"{self.source}: no layer named '{name}'{nearest(name, names)}")
        return names.index(name)

    def forward(self, blobs: Iterable[str] | None = None, start: str | None = None, end: str | None = None,
                **kwargs: Any) -> dict[str, np.ndarray]:
        """Run the net (pycaffe's ``forward``): inputs by name, returns ``{output: ndarray}``
        (plus any extra ``blobs`` asked for). ``start``/``end`` are layer names (inclusive)."""
        if self._fast is not None:
            return self._fast.net_forward(self, blobs, start, end, kwargs)
        feeds = self._feeds(kwargs)
        s = self._layer_index(start, 0)
        e = self._layer_index(end, len(self._plans) - 1) + 1
        with torch.set_grad_enabled(self._needs_grad()):
            table = dict(feeds) if s == 0 else self._table
            self._table = self.module.run(feeds, end=e, start=s, blobs=table)
        self._graph_ready = torch.is_grad_enabled() and self._needs_grad()
        self._diff_bufs = {}
        loss = self.module.loss(self._table) if e == len(self._plans) else None
        self.loss = float(loss.detach()) if loss is not None else None
        outs = list(self.outputs) if end is None else list(self._plans[e - 1].tops)
        outs += [b for b in (blobs or []) if b not in outs]
        return {name: self.blobs[name].data for name in outs}

    def backward(self, diffs: Iterable[str] | None = None, **kwargs: Any) -> dict[str, np.ndarray]:
        """Backpropagate (pycaffe's ``backward``): top diffs are the loss weights for loss outputs,
        the diffs set on output blobs (``net.blobs[out].diff[...] = g``), or given by name.
        Returns the input blobs' diffs (plus any ``diffs`` asked for)."""
        if self._fast is not None:
            raise CaffeportError(f"{self.source}: a fast Net (fast=True) is inference-only: no backward")
        if not self._graph_ready:
            # The last forward kept no graph (inference): run it again with one, keeping the diffs
            # the caller set on output blobs.
            user_diffs = self._diff_bufs
            with torch.enable_grad():
                force = self.force_backward
                self.force_backward = True
                try:
                    self.forward()
                finally:
                    self.force_backward = force
            self._diff_bufs = user_diffs
        tensors, grads = [], []
        weights = self.loss_weights
        for name in self.outputs:
            t = self._table[name]
            if not t.requires_grad:
                continue
            if name in kwargs:
                g = torch.tensor(np.asarray(kwargs[name], dtype=np.float32)).reshape(t.shape).to(t.device)
            elif name in self._diff_bufs:
                g = self._diff_bufs[name]
            elif name in weights:
                g = torch.full_like(t, weights[name])
            else:
                continue
            tensors.append(t)
            grads.append(g)
        for t in self._table.values():
            if t.requires_grad and not t.is_leaf:
                t.retain_grad()
        if tensors:
            torch.autograd.backward(tensors, grads)
        self._graph_ready = False
        names = list(self.inputs) + [d for d in (diffs or []) if d not in self.inputs]
        return {n: self.blobs[n].diff for n in names}

    def forward_backward(
        self, feeds: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """One training pass as Caffe's ``ForwardBackward``: forward (data layers read their next
        batch), ``backward`` of the weighted loss into the param grads. Returns (loss, blob table)."""
        with torch.enable_grad():
            table = self.module.run(dict(feeds or self._inputs))
            loss = self.module.loss(table)
            if loss is not None and loss.requires_grad:
                loss.backward()
        self._table = table
        self.loss = float(loss.detach()) if loss is not None else 0.0
        return self.loss, table

    def clear_param_diffs(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def reshape(self) -> None:
        """Propagate new input shapes through the net (Caffe's ``Net::Reshape``): blob shapes are
        recomputed without running data layers or advancing any layer state; blob values are reset."""
        shapes: dict[str, Shape] = {}
        for plan in self._plans:
            layer = plan.layer
            if layer.is_input:
                tops = [tuple(self._inputs[t].shape) for t in plan.tops]
            elif layer.is_data:
                tops = layer.top_shapes([]) or [self._shapes[t] for t in plan.tops]
            else:
                tops = _infer_top_shapes(layer, [shapes[b] for b in plan.bottoms])
            for t, s in zip(plan.tops, tops):
                shapes[t] = tuple(int(d) for d in s)
        self._shapes = shapes
        self._table = {}
        self._diff_bufs = {}
        self._graph_ready = False

    def _reshape_input(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self._inputs:
            raise CaffeportError(f"{self.source}: only input blobs can be reshaped; '{name}' is not one "
                                 f"(inputs: {', '.join(self.inputs)})")
        self._inputs[name] = torch.zeros(shape, device=self._device)

    def _blob_tensor(self, name: str) -> torch.Tensor:
        if name in self._table:
            return self._table[name]
        if name in self._inputs:
            return self._inputs[name]
        if name not in self._shapes:
            raise KeyError(name)
        # Not computed yet: a zero blob of the inferred shape, as Caffe's freshly allocated blobs.
        t = torch.zeros(self._shapes[name], device=self._device)
        self._table[name] = t
        return t

    def _blob_diff(self, name: str) -> np.ndarray:
        t = self._blob_tensor(name)
        if t.grad is not None:
            return _as_numpy(t.grad)
        if name not in self._diff_bufs or self._diff_bufs[name].shape != t.shape:
            self._diff_bufs[name] = torch.zeros_like(t.detach())
        return _as_numpy(self._diff_bufs[name])

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
        for name, layer in self.layer_dict.items():
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
        if name not in self.layer_dict:
            raise CaffeportError(f"{self.source}: no layer named '{name}'{nearest(name, self.layer_dict)}")
        return self.layer_dict[name]

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
