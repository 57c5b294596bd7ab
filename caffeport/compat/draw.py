"""pycaffe's ``caffe.draw``: pictures of a NetParameter (``get_pydot_graph``, ``draw_net``,
``draw_net_to_file``), drawn by caffeport's own net drawing (:mod:`caffeport.export.draw`).

Same arguments as pycaffe: ``rankdir`` ('LR', 'TB', 'BT', 'RL'), ``phase`` (``caffe.TRAIN``,
``caffe.TEST`` or None for every layer; pycaffe's rule: a layer is kept when it has no ``include``
or an ``include`` with that phase, and no ``exclude`` with it), ``display_lrm`` (learning-rate
multipliers), ``label_edges`` (output sizes on the edges out of Data/Convolution/InnerProduct).

Where caffeport differs from pycaffe:

- The picture is caffeport's: an in-place layer's output blob is drawn again after it (pycaffe
  draws a cycle), layers are coloured by kind (data, loss, in-place, other), labels carry
  caffeport's parameter summary.
- ``get_pydot_graph`` returns a ``pydot.Dot`` when pydot is installed; without pydot it returns a
  :class:`DotGraph` with the same ``to_string()``, ``create(format=...)``, ``write(path, format=...)``
  and ``create_<fmt>``/``write_<fmt>`` methods.
- ``draw_net`` renders through Graphviz's ``dot`` program when installed; without it ``'png'`` is
  drawn with matplotlib, ``'raw'``/``'dot'`` give the DOT text, and other formats raise a
  CaffeportError saying how to install Graphviz.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from caffeport.errors import CaffeportError
from caffeport.export import draw as _draw
from caffeport.io.atomic import atomic_write
from caffeport.proto import caffe_pb2

__all__ = ["get_pydot_graph", "draw_net", "draw_net_to_file", "DotGraph", "get_pooling_types_dict",
           "get_edge_label", "get_layer_lr_mult", "get_layer_label", "choose_color_by_layertype",
           "LAYER_STYLE_DEFAULT", "NEURON_LAYER_STYLE", "BLOB_STYLE"]

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": _draw.LAYER_COLOR, "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": _draw.INPLACE_COLOR, "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": _draw.BLOB_COLOR, "style": "filled"}


class CompatDrawValueError(CaffeportError, ValueError):
    """A net pycaffe's drawing refuses (it raises ValueError)."""


def get_pooling_types_dict() -> dict[int, str]:
    """``{PoolMethod number: name}``."""
    return {v.number: k for k, v in caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values_by_name.items()}


def get_edge_label(layer: caffe_pb2.LayerParameter) -> str:
    """pycaffe's edge label: ``Batch N`` out of Data, ``num_output`` out of Convolution,
    Deconvolution and InnerProduct, otherwise ``'""'`` (an empty DOT label)."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer: caffe_pb2.LayerParameter) -> tuple[float, float]:
    """Weight and bias ``lr_mult`` of a Convolution, Deconvolution or InnerProduct layer."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        raise CompatDrawValueError(f"{layer.type} layers do not have a learning rate multiplier")
    specs = list(layer.param)
    if len(specs) > 2:
        raise CompatDrawValueError(f"layer {layer.name!r}: could not parse the learning rate multiplier")
    lrm = [s.lr_mult for s in specs] + [1.0] * (2 - len(specs))
    return float(lrm[0]), float(lrm[1])


def get_layer_label(layer: caffe_pb2.LayerParameter, rankdir: str, display_lrm: bool = False) -> str:
    """pycaffe's node label (quoted): name, (type), kernel/stride/pad, lr mults."""
    sep = " " if rankdir in ("TB", "BT") else r"\n"
    parts = [layer.name]
    if layer.type == "Pooling":
        parts.append(f"({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            pp = layer.pooling_param
            k, s, p = pp.kernel_size, pp.stride, pp.pad
        else:
            cp = layer.convolution_param
            k = cp.kernel_size[0] if len(cp.kernel_size) else 1
            s = cp.stride[0] if len(cp.stride) else 1
            p = cp.pad[0] if len(cp.pad) else 0
        parts.append(sep.join([f"kernel size: {k}", f"stride: {s}", f"pad: {p}"]))
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        lrm0, lrm1 = get_layer_lr_mult(layer)
        if lrm0 or lrm1:
            parts.append(f"lr mult: {lrm0:.1f}, {lrm1:.1f}")
    return '"' + sep.join(parts) + '"'


def choose_color_by_layertype(layertype: str) -> str:
    """pycaffe's colours: convolutions red, pooling orange, inner products purple, others blue."""
    return {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
            "InnerProduct": "#CC33FF"}.get(layertype, _draw.LAYER_COLOR)


def _phase_value(phase: Any) -> int | None:
    if phase is None:
        return None
    if isinstance(phase, str):
        key = phase.upper()
        if key == "ALL":
            return None
        if key in ("TRAIN", "TEST"):
            return caffe_pb2.TRAIN if key == "TRAIN" else caffe_pb2.TEST
        raise CaffeportError(f"phase {phase!r}: expected caffe.TRAIN, caffe.TEST or None")
    if int(phase) not in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        raise CaffeportError(f"phase {phase!r}: expected caffe.TRAIN, caffe.TEST or None")
    return int(phase)


def _filter_phase(net: caffe_pb2.NetParameter, phase: int | None) -> caffe_pb2.NetParameter:
    """pycaffe's phase filter (phase fields only; an unset rule phase reads as TRAIN, as in pycaffe)."""
    if phase is None:
        return net
    kept = caffe_pb2.NetParameter()
    kept.CopyFrom(net)
    del kept.layer[:]
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise CompatDrawValueError(f"layer {layer.name} has both include and exclude specified.")
        included = not layer.include or any(r.phase == phase for r in layer.include)
        included = included and not any(r.phase == phase for r in layer.exclude)
        if included:
            kept.layer.add().CopyFrom(layer)
    return kept


def _as_net(caffe_net: Any) -> caffe_pb2.NetParameter:
    if isinstance(caffe_net, caffe_pb2.NetParameter):
        return caffe_net
    if hasattr(caffe_net, "SerializeToString") and hasattr(caffe_net, "layer"):  # another caffe_pb2 module
        net = caffe_pb2.NetParameter()
        net.ParseFromString(caffe_net.SerializeToString())
        return net
    if isinstance(caffe_net, (str, os.PathLike)):
        from caffeport.io import read_net

        return read_net(caffe_net)
    raise CaffeportError(f"caffe.draw: expected a caffe_pb2.NetParameter, got {type(caffe_net).__name__}")


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _style_attrs(kind: str) -> dict[str, str]:
    """caffeport's node style for ``kind`` as DOT attributes (values quoted as DOT wants)."""
    out: dict[str, str] = {}
    for item in re.finditer(r'(\w+)=("[^"]*"|[^,\s]+)', _draw._STYLE[kind]):
        out[item.group(1)] = item.group(2)
    return out


def _elements(caffe_net: Any, rankdir: str, label_edges: bool, phase: Any, display_lrm: bool) -> tuple:
    """(graph, rankdir, nodes [(id, quoted label, attrs)], edges [(a, b, quoted label or None)])."""
    net = _filter_phase(_as_net(caffe_net), _phase_value(phase))
    rankdir = str(rankdir).upper()
    if rankdir not in _draw.RANKDIRS:
        raise CaffeportError(f"rankdir {rankdir!r}: expected one of {', '.join(_draw.RANKDIRS)}")
    g = _draw.build_graph(net, phase="ALL", display_lrm=display_lrm)
    g.name = net.name or "Net"
    sep = " " if rankdir in ("TB", "BT") else "\n"
    nodes = []
    for n in g.nodes:
        label = n.label if n.kind.startswith("blob") else n.label.replace("\n", sep)
        nodes.append((n.id, f'"{_esc(label)}"', _style_attrs(n.kind)))
    edges = []
    for a, b in g.edges:
        label = None
        if label_edges and a.startswith("layer"):
            text = get_edge_label(net.layer[int(a[len("layer"):])])
            if text != '""':
                label = f'"{_esc(text)}"'
        edges.append((a, b, label))
    return g, rankdir, nodes, edges


def _dot_text(caffe_net: Any, rankdir: str, label_edges: bool, phase: Any, display_lrm: bool) -> tuple[str, Any]:
    g, rankdir, nodes, edges = _elements(caffe_net, rankdir, label_edges, phase, display_lrm)
    lines = [f'digraph "{_esc(g.name)}" {{', f"  rankdir={rankdir};",
             '  node [fontname="Helvetica", fontsize=10];', "  edge [arrowsize=0.7];"]
    for node_id, label, attrs in nodes:
        lines.append(f"  {node_id} [label={label}, " + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "];")
    for a, b, label in edges:
        lines.append(f"  {a} -> {b}" + (f" [label={label}]" if label else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n", g


_FORMATS = ("raw", "dot", "png", "svg", "pdf", "ps", "jpg", "jpeg", "gif")


def _render(dot_text: str, g: Any, ext: str, rankdir: str) -> bytes:
    ext = ext.lower().lstrip(".")
    if ext in ("raw", "dot"):
        return dot_text.encode()
    if shutil.which("dot") is None and ext == "png":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "net.png"
            _draw.draw_matplotlib(g, path, rankdir)
            return path.read_bytes()
    return _draw.render(dot_text, ext)


class DotGraph:
    """What ``get_pydot_graph`` returns when pydot is not installed: the DOT text with pydot's
    ``to_string``/``create``/``write`` methods (rendering as :func:`draw_net` does)."""

    def __init__(self, dot_text: str, graph: Any, rankdir: str):
        self._text = dot_text
        self._graph = graph
        self._rankdir = rankdir

    def get_name(self) -> str:
        return self._graph.name

    def to_string(self) -> str:
        return self._text

    def create(self, prog: str = "dot", format: str = "ps", encoding: Any = None) -> bytes:  # noqa: A002
        return _render(self._text, self._graph, format, self._rankdir)

    def write(self, path: str | os.PathLike, prog: str = "dot", format: str = "raw",  # noqa: A002
              encoding: Any = None) -> bool:
        atomic_write(Path(path), self.create(format=format))
        return True

    def __getattr__(self, name: str) -> Any:
        for prefix in ("create_", "write_"):
            if name.startswith(prefix) and name[len(prefix):] in _FORMATS:
                fmt = name[len(prefix):]
                if prefix == "create_":
                    return lambda prog="dot", encoding=None: self.create(format=fmt)
                return lambda path, prog="dot", encoding=None: self.write(path, format=fmt)
        raise AttributeError(name)

    def __str__(self) -> str:
        return self._text


def get_pydot_graph(caffe_net: Any, rankdir: str, label_edges: bool = True, phase: Any = None,
                    display_lrm: bool = False) -> Any:
    """The net as a ``pydot.Dot`` (or a :class:`DotGraph` without pydot)."""
    try:
        import pydot
    except ImportError:
        text, g = _dot_text(caffe_net, rankdir, label_edges, phase, display_lrm)
        return DotGraph(text, g, str(rankdir).upper())
    g, rankdir, nodes, edges = _elements(caffe_net, rankdir, label_edges, phase, display_lrm)
    graph = pydot.Dot(f'"{_esc(g.name)}"', graph_type="digraph", rankdir=rankdir)
    graph.set_node_defaults(fontname='"Helvetica"', fontsize="10")
    graph.set_edge_defaults(arrowsize="0.7")
    for node_id, label, attrs in nodes:
        graph.add_node(pydot.Node(node_id, label=label, **attrs))
    for a, b, label in edges:
        graph.add_edge(pydot.Edge(a, b, label=label) if label else pydot.Edge(a, b))
    return graph


def draw_net(caffe_net: Any, rankdir: str, ext: str = "png", phase: Any = None, display_lrm: bool = False) -> bytes:
    """The picture of the net encoded as ``ext`` ('png', 'svg', 'pdf'..., or 'raw'/'dot' for DOT text)."""
    text, g = _dot_text(caffe_net, rankdir, True, phase, display_lrm)
    return _render(text, g, ext, str(rankdir).upper())


def draw_net_to_file(caffe_net: Any, filename: str | os.PathLike, rankdir: str = "LR", phase: Any = None,
                     display_lrm: bool = False) -> None:
    """Write the picture to ``filename``, in the format its extension names ('.raw' = DOT text)."""
    name = str(filename)
    ext = name[name.rfind(".") + 1:] if "." in os.path.basename(name) else ""
    if ext.lower() not in _FORMATS:
        raise CaffeportError(f"{name}: unknown picture format '.{ext}' (use .{', .'.join(_FORMATS)})")
    atomic_write(Path(name), draw_net(caffe_net, rankdir, ext, phase, display_lrm))
