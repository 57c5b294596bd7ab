"""Pictures of nets, like Caffe's ``draw_net.py``: layers as boxes, blobs as octagons.

The Graphviz DOT text is written natively (no pydot, no system package). PNG/SVG/PDF are rendered by
the Graphviz ``dot`` program when it is installed; without it a PNG is drawn with matplotlib (a
simple layered layout) and SVG/PDF raise an error saying how to install Graphviz.

In-place layers (top == bottom, e.g. ReLU after a convolution) are drawn in their own colour with a
dashed border, and the blob they rewrite appears again after them (dashed octagon, same name), so the
order of in-place updates stays visible and the graph has no cycles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from caffeport.errors import CaffeportError
from caffeport.io.atomic import atomic_path, atomic_write
from caffeport.proto import caffe_pb2

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}
RANKDIRS = ("LR", "TB", "BT", "RL")
FORMATS = ("dot", "png", "svg", "pdf")

LAYER_COLOR = "#6495ED"
INPLACE_COLOR = "#90EE90"
DATA_COLOR = "#F0E68C"
LOSS_COLOR = "#F4A460"
BLOB_COLOR = "#E0E0E0"


@dataclass
class DrawNode:
    id: str
    label: str
    kind: str  # "layer", "inplace", "data", "loss", "blob", "blob-inplace"
    rank: int = 0


@dataclass
class DrawGraph:
    """Nodes and edges of a net drawing, independent of the output format."""

    name: str
    nodes: list[DrawNode] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


def _fmt_list(values: Sequence[int]) -> str:
    vals = list(values)
    return str(vals[0]) if len(vals) == 1 else "x".join(str(v) for v in vals)


def layer_details(lp: caffe_pb2.LayerParameter, display_lrm: bool = False) -> list[str]:
    """The key parameters of a layer, one short line each (kernel/stride/pad, num_output...)."""
    lines: list[str] = []
    if lp.HasField("convolution_param"):
        cp = lp.convolution_param
        k = [cp.kernel_h, cp.kernel_w] if cp.HasField("kernel_h") else list(cp.kernel_size)
        s = [cp.stride_h, cp.stride_w] if cp.HasField("stride_h") else list(cp.stride) or [1]
        p = [cp.pad_h, cp.pad_w] if cp.HasField("pad_h") else list(cp.pad) or [0]
        lines.append(f"kernel {_fmt_list(k)}, stride {_fmt_list(s)}, pad {_fmt_list(p)}")
        extra = f"num_output {cp.num_output}"
        if cp.group != 1:
            extra += f", group {cp.group}"
        if list(cp.dilation) and any(d != 1 for d in cp.dilation):
            extra += f", dilation {_fmt_list(cp.dilation)}"
        lines.append(extra)
    if lp.HasField("pooling_param"):
        pp = lp.pooling_param
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(pp.pool)
        if pp.global_pooling:
            lines.append(f"{method}, global")
        else:
            k = [pp.kernel_h, pp.kernel_w] if pp.HasField("kernel_h") else [pp.kernel_size]
            s = [pp.stride_h, pp.stride_w] if pp.HasField("stride_h") else [pp.stride]
            p = [pp.pad_h, pp.pad_w] if pp.HasField("pad_h") else [pp.pad]
            lines.append(f"{method} kernel {_fmt_list(k)}, stride {_fmt_list(s)}, pad {_fmt_list(p)}")
        if pp.round_mode == caffe_pb2.PoolingParameter.FLOOR:
            lines.append("round FLOOR")
    if lp.HasField("inner_product_param"):
        lines.append(f"num_output {lp.inner_product_param.num_output}")
    if lp.HasField("lrn_param"):
        lr = lp.lrn_param
        region = caffe_pb2.LRNParameter.NormRegion.Name(lr.norm_region)
        lines.append(f"size {lr.local_size}, alpha {lr.alpha:g}, beta {lr.beta:g} ({region})")
    if lp.HasField("dropout_param"):
        lines.append(f"ratio {lp.dropout_param.dropout_ratio:g}")
    if lp.type == "Input" and lp.input_param.shape:
        lines.append(", ".join(_fmt_list(s.dim) for s in lp.input_param.shape))
    for fname in ("data_param", "image_data_param", "hdf5_data_param"):
        if lp.HasField(fname):
            sub = getattr(lp, fname)
            if getattr(sub, "batch_size", 0):
                lines.append(f"batch {sub.batch_size}")
    if lp.HasField("eltwise_param"):
        lines.append(caffe_pb2.EltwiseParameter.EltwiseOp.Name(lp.eltwise_param.operation))
    if display_lrm and lp.param:
        for i, spec in enumerate(lp.param):
            lines.append(f"param {i}: lr_mult {spec.lr_mult:g}, decay_mult {spec.decay_mult:g}")
    if lp.include or lp.exclude:
        phases = [caffe_pb2.Phase.Name(r.phase) for r in lp.include if r.HasField("phase")]
        if phases:
            lines.append("only " + "/".join(phases))
    return lines


def _kind(lp: caffe_pb2.LayerParameter) -> str:
    from caffeport.layers.base import layer_class

    cls = layer_class(lp.type)
    if (cls is not None and cls.is_data) or lp.type.endswith("Data") or lp.type == "Input":
        return "data"
    if (cls is not None and cls.is_loss) or lp.type.endswith("Loss") or lp.type == "Accuracy":
        return "loss"
    if lp.bottom and list(lp.top) == list(lp.bottom[: len(lp.top)]) and lp.top:
        return "inplace"
    return "layer"


def build_graph(net: caffe_pb2.NetParameter, *, phase: str = "ALL", display_lrm: bool = False,
                source: str = "<net>") -> DrawGraph:
    """The drawing of ``net`` (layers filtered by ``phase``: TRAIN, TEST or ALL)."""
    from caffeport.graph import filter_net, net_state

    if phase.upper() not in PHASES:
        raise CaffeportError(f"--phase {phase!r}: expected one of {', '.join(PHASES)}")
    ph = PHASES[phase.upper()]
    if ph is not None:
        net = filter_net(net, net_state(ph), source)
    g = DrawGraph(name=net.name or "net")
    current: dict[str, str] = {}  # blob name -> node id of its latest version
    rank: dict[str, int] = {}
    counter = 0

    def blob_node(name: str, inplace: bool, r: int) -> str:
        nonlocal counter
        counter += 1
        node_id = f"blob{counter}"
        g.nodes.append(DrawNode(node_id, name, "blob-inplace" if inplace else "blob", r))
        rank[node_id] = r
        current[name] = node_id
        return node_id

    for i, lp in enumerate(net.layer):
        kind = _kind(lp)
        lid = f"layer{i}"
        r = 0
        for b in lp.bottom:
            if b not in current:  # produced by a layer of another phase, or a net-level input
                blob_node(b, False, 0)
            r = max(r, rank[current[b]] + 1)
        label = "\n".join([lp.name, f"({lp.type}{', in-place' if kind == 'inplace' else ''})",
                           *layer_details(lp, display_lrm)])
        g.nodes.append(DrawNode(lid, label, kind, r))
        rank[lid] = r
        for b in lp.bottom:
            g.edges.append((current[b], lid))
        for t in lp.top:
            inplace = t in lp.bottom or t in current
            nid = blob_node(t, inplace, r + 1)
            g.edges.append((lid, nid))
    return g


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_STYLE = {
    "layer": f'shape=box, style="filled,rounded", fillcolor="{LAYER_COLOR}"',
    "data": f'shape=box, style="filled,rounded", fillcolor="{DATA_COLOR}"',
    "loss": f'shape=box, style="filled,rounded", fillcolor="{LOSS_COLOR}"',
    "inplace": f'shape=box, style="filled,rounded,dashed", fillcolor="{INPLACE_COLOR}"',
    "blob": f'shape=octagon, style=filled, fillcolor="{BLOB_COLOR}"',
    "blob-inplace": f'shape=octagon, style="filled,dashed", fillcolor="{BLOB_COLOR}"',
}


def to_dot(g: DrawGraph, rankdir: str = "LR") -> str:
    """Graphviz DOT text of a drawing."""
    if rankdir.upper() not in RANKDIRS:
        raise CaffeportError(f"--rankdir {rankdir!r}: expected one of {', '.join(RANKDIRS)}")
    lines = [f'digraph "{_dot_escape(g.name)}" {{',
             f"  rankdir={rankdir.upper()};",
             '  node [fontname="Helvetica", fontsize=10];',
             "  edge [arrowsize=0.7];"]
    for n in g.nodes:
        lines.append(f'  {n.id} [label="{_dot_escape(n.label)}", {_STYLE[n.kind]}];')
    for a, b in g.edges:
        lines.append(f"  {a} -> {b};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """Run Graphviz ``dot -T<fmt>`` on the text; CaffeportError when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise CaffeportError(
            f"drawing to .{fmt} needs the Graphviz 'dot' program, which is not installed "
            "(apt-get install graphviz, brew install graphviz or conda install graphviz); "
            "or write a .dot file and render it elsewhere")
    proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise CaffeportError(f"Graphviz dot failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def draw_matplotlib(g: DrawGraph, path: Path, rankdir: str = "LR") -> None:
    """A PNG of the drawing without Graphviz: nodes placed in ranks, edges as arrows."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    by_rank: dict[int, list[DrawNode]] = {}
    for n in g.nodes:
        by_rank.setdefault(n.rank, []).append(n)
    n_ranks = max(by_rank) + 1 if by_rank else 1
    width = max((len(v) for v in by_rank.values()), default=1)
    pos: dict[str, tuple[float, float]] = {}
    horizontal = rankdir.upper() in ("LR", "RL")
    for r, nodes in by_rank.items():
        for j, n in enumerate(nodes):
            along = r if rankdir.upper() in ("LR", "TB") else n_ranks - 1 - r
            across = j - (len(nodes) - 1) / 2
            pos[n.id] = (along * 2.2, -across * 1.6) if horizontal else (across * 2.6, -along * 1.3)
    size = (max(6, n_ranks * 1.6), max(4, width * 1.4)) if horizontal else (max(6, width * 2.2), max(4, n_ranks))
    fig, ax = plt.subplots(figsize=(min(size[0], 200), min(size[1], 200)))
    colors = {"layer": LAYER_COLOR, "data": DATA_COLOR, "loss": LOSS_COLOR, "inplace": INPLACE_COLOR,
              "blob": BLOB_COLOR, "blob-inplace": BLOB_COLOR}
    for a, b in g.edges:
        ax.annotate("", xy=pos[b], xytext=pos[a],
                    arrowprops=dict(arrowstyle="->", color="#555555", shrinkA=14, shrinkB=14))
    for n in g.nodes:
        box = "round,pad=0.3" if not n.kind.startswith("blob") else "sawtooth,pad=0.3"
        ls = "--" if n.kind in ("inplace", "blob-inplace") else "-"
        ax.text(*pos[n.id], n.label, ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle=box, fc=colors[n.kind], ec="#333333", ls=ls))
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.axis("off")
    ax.set_title(g.name)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def draw_net_file(model: str | os.PathLike, out: str | os.PathLike, *, rankdir: str = "LR",
                  phase: str = "ALL", display_lrm: bool = False) -> str:
    """Draw a net file to ``out`` (format from the suffix). Returns how it was rendered."""
    from caffeport.io import read_net

    out_path = Path(out)
    fmt = out_path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise CaffeportError(f"{out}: unknown picture format '.{fmt}' (use .{', .'.join(FORMATS)})")
    net = read_net(model)
    g = build_graph(net, phase=phase, display_lrm=display_lrm, source=str(model))
    dot_text = to_dot(g, rankdir)
    if fmt == "dot":
        atomic_write(out_path, dot_text.encode())
        return "dot text"
    if shutil.which("dot") is None and fmt == "png":
        draw_matplotlib(g, out_path, rankdir)
        return "matplotlib (Graphviz 'dot' not installed: apt-get install graphviz for a better layout)"
    atomic_write(out_path, render(dot_text, fmt))
    return "graphviz dot"
