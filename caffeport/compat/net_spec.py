"""pycaffe's ``caffe.net_spec``: write nets in Python (``caffe.NetSpec``, ``caffe.layers`` as ``L``,
``caffe.params`` as ``P``, ``caffe.to_proto``) and get the NetParameter pycaffe would produce.

The rules are pycaffe's (BVLC ``python/caffe/net_spec.py``):

- ``L.Type(*bottoms, **kwargs)`` makes one layer; ``ntop`` (default 1) says how many tops it has
  (0 returns the layer itself, 1 its top, more a tuple of tops); ``in_place=True`` makes the tops
  the bottoms.
- A keyword ending in ``param`` (``param``, ``loss_param``, ``convolution_param``...) goes to the
  layer; any other goes into the layer's own ``<type>_param`` message when that message has such a
  field, otherwise to the layer (``loss_weight``, ``include``, ``name``...).
- Lists fill repeated fields (a lone value becomes a one-element list), dicts fill messages,
  lists of dicts add repeated messages (``param=[dict(lr_mult=1), dict(lr_mult=2)]``).
- Names: a top assigned to a ``NetSpec`` attribute gets that name; other tops are named
  ``<Type><n>`` with one counter per type; a layer takes the name of its first top (in-place layers
  and layers without tops get ``<Type><n>`` unless assigned). Layers are emitted bottoms first,
  in the order the assigned tops were assigned.

Where caffeport differs: a keyword that fits no field raises :class:`CaffeportError` (also an
``AttributeError``, as pycaffe's) naming the layer and the keyword; tuples are accepted wherever
pycaffe wants lists, and an empty list sets nothing (pycaffe fails on it with an IndexError).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = ["NetSpec", "Top", "Function", "Layers", "Parameters", "layers", "params", "to_proto",
           "assign_proto", "param_name_dict"]


class NetSpecAttributeError(CaffeportError, AttributeError):
    """A keyword that names no field of the layer (pycaffe raises AttributeError)."""


class NetSpecTypeError(CaffeportError, TypeError):
    """A layer input that is not a Top (pycaffe raises TypeError with the same message)."""


class NetSpecValueError(CaffeportError, TypeError, ValueError):
    """A value of the wrong kind for its field (pycaffe raises TypeError or ValueError)."""


class NetSpecKeyError(CaffeportError, AttributeError, KeyError):
    """A name that was never assigned to the NetSpec (pycaffe raises KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def param_name_dict() -> dict[str, str]:
    """``{layer type: param prefix}`` from LayerParameter's ``*_param`` fields, e.g.
    ``'Convolution' -> 'convolution'`` (message type name without ``Parameter``)."""
    out: dict[str, str] = {}
    for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if f.name.endswith("_param") and f.message_type is not None:
            type_name = f.message_type.name
            if type_name.endswith("Parameter"):
                type_name = type_name[: -len("Parameter")]
            out[type_name] = f.name[: -len("_param")]
    return out


def _is_list(val: Any) -> bool:
    return isinstance(val, (list, tuple))


def assign_proto(proto: Any, name: str, val: Any) -> None:
    """Set field ``name`` of message ``proto`` from a Python value: lists fill repeated fields,
    dicts fill sub-messages (recursively), other values are assigned."""
    try:
        current = getattr(proto, name)
    except AttributeError:
        raise NetSpecAttributeError(f"{type(proto).__name__} has no field {name!r}") from None
    try:
        if hasattr(current, "extend"):  # repeated field
            vals = list(val) if _is_list(val) else [val]
            if vals and isinstance(vals[0], dict):
                for item in vals:
                    sub = current.add()
                    for k, v in item.items():
                        assign_proto(sub, k, v)
            else:
                current.extend(vals)
        elif isinstance(val, dict):
            for k, v in val.items():
                assign_proto(current, k, v)
        elif _is_list(val):
            raise NetSpecValueError(f"{type(proto).__name__}.{name} is not a repeated field: got {val!r}")
        else:
            setattr(proto, name, val)
    except AttributeError as err:
        if isinstance(err, NetSpecAttributeError):
            raise
        raise NetSpecValueError(f"{type(proto).__name__}.{name} = {val!r}: {err}") from None
    except (TypeError, ValueError) as err:
        if isinstance(err, CaffeportError):
            raise
        raise NetSpecValueError(f"{type(proto).__name__}.{name} = {val!r}: {err}") from None


class Top:
    """One output blob of a layer (``fn`` the layer, ``n`` its index among the layer's tops)."""

    def __init__(self, fn: Function, n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The NetParameter of every layer needed to compute this top (automatic names)."""
        return to_proto(self)

    def _to_proto(self, layers: OrderedDict, names: dict, autonames: Counter) -> None:
        self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """A layer: its type, its input Tops and its keyword parameters."""

    def __init__(self, type_name: str, inputs: tuple, params: dict[str, Any]):
        self.type_name = type_name
        for index, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                raise NetSpecTypeError(f"{type_name} input {index} is not a Top (type is {type(inp)})")
        self.inputs = inputs
        self.params = params
        self.ntop = int(self.params.pop("ntop", 1))
        self.in_place = bool(self.params.pop("in_place", False))
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _top_name(self, top: Top, names: dict, autonames: Counter) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _layer_name(self, names: dict, autonames: Counter) -> str:
        if self not in names:
            if self.ntop > 0:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _to_proto(self, layers: OrderedDict, names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        bottoms = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottoms.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._top_name(t, names, autonames) for t in self.tops)
        layer.name = self._layer_name(names, autonames)
        prefix = _PARAM_NAMES.get(self.type_name)
        for k, v in self.params.items():
            where = f"layer {layer.name!r} ({self.type_name}): keyword {k}"
            try:
                if k.endswith("param") or prefix is None:
                    assign_proto(layer, k, v)
                    continue
                try:
                    assign_proto(getattr(layer, prefix + "_param"), k, v)
                except NetSpecAttributeError as first:
                    try:
                        assign_proto(layer, k, v)
                    except NetSpecAttributeError as second:
                        raise NetSpecAttributeError(f"{first}; {second}") from None
            except NetSpecAttributeError as err:
                raise NetSpecAttributeError(f"{where}: {err}") from None
            except NetSpecValueError as err:
                raise NetSpecValueError(f"{where}: {err}") from None
        layers[self] = layer

    def __repr__(self) -> str:
        return f"<Function {self.type_name}>"


def to_proto(*tops: Top | Function) -> caffe_pb2.NetParameter:
    """The NetParameter of every layer needed to compute ``tops``, with automatic names."""
    layers: OrderedDict = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        fn = top.fn if isinstance(top, Top) else top
        fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Tops assigned as attributes (or items) are named after the attribute; ``to_proto()`` makes
    the NetParameter of every layer needed for them."""

    def __init__(self) -> None:
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value: Any) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        try:
            return self.tops[name]
        except KeyError:
            raise NetSpecKeyError(f"NetSpec has no top named {name!r}") from None

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str) -> Any:
        return self.__getattr__(item)

    def to_proto(self) -> caffe_pb2.NetParameter:
        names = {v: k for k, v in self.tops.items()}
        autonames: Counter = Counter()
        layers: OrderedDict = OrderedDict()
        for name, top in self.tops.items():
            if not isinstance(top, (Top, Function)):
                hint = " (a layer with several tops: unpack them, n.a, n.b = L.X(..., ntop=2))" \
                    if isinstance(top, tuple) else ""
                raise NetSpecTypeError(f"NetSpec.{name} is not a Top (type is {type(top)}){hint}")
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``L.Convolution(bottom, kernel_size=3)``: any attribute is a layer type."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)

        def layer_fn(*args: Top, **kwargs: Any) -> Any:
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = name
        return layer_fn


class _ParamEnums:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, value_name: str) -> Any:
        if value_name.startswith("__") and value_name.endswith("__"):
            raise AttributeError(value_name)
        msg = getattr(caffe_pb2, self._name + "Parameter", None)
        if msg is None:
            raise NetSpecAttributeError(f"caffe.params.{self._name}: no message {self._name}Parameter in caffe.proto")
        try:
            return getattr(msg, value_name)
        except AttributeError:
            raise NetSpecAttributeError(
                f"caffe.params.{self._name}.{value_name}: {self._name}Parameter has no such value") from None


class Parameters:
    """``P.Pooling.MAX`` is ``caffe_pb2.PoolingParameter.MAX``."""

    def __getattr__(self, name: str) -> _ParamEnums:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _ParamEnums(name)


_PARAM_NAMES = param_name_dict()
layers = Layers()
params = Parameters()
