"""Net surgery on ``NetParameter`` messages (and their weights): what Caffe users do by hand.

- :func:`deploy_net`: a train_val/test net -> its deploy form. Data layers become ``Input`` layers
  (batch from the data layer or ``batch``; C/H/W from ``crop_size``, the layer's own dims, or the
  first record of the LMDB when readable, else from ``input_shapes``), ``SoftmaxWithLoss`` becomes
  ``Softmax`` with top ``prob`` (``SigmoidCrossEntropyLoss`` -> ``Sigmoid``), other losses and
  ``Accuracy`` are dropped, then every layer that only fed dropped layers (or needs a dropped blob,
  e.g. the label). Nets already fed by ``Input`` layers (hand-written TEST nets with a label input)
  keep their data inputs and lose the label tops that only dropped layers read. Training-only
  fields (``param`` lr/decay multipliers, fillers, ``include``/``exclude``, ``loss_weight``,
  ``propagate_down``) are stripped.
- :func:`convolutionalize`: InnerProduct -> Convolution over the bottom's whole spatial extent (the
  first fc) or 1x1 (later fcs), weights reshaped (Caffe's ``net_surgery`` / OverFeat "fully
  convolutional" nets).
- :func:`truncate`: the net (and weights) up to a named blob, keeping only what it depends on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caffeport.errors import CaffeportError, nearest
from caffeport.proto import caffe_pb2

PathLike = str | os.PathLike

# Loss layers with a deploy-time counterpart: (type, name/top of the new layer).
_LOSS_TO_OUTPUT = {"SoftmaxWithLoss": "Softmax", "SigmoidCrossEntropyLoss": "Sigmoid"}
_NOT_DEPLOY = {"Accuracy", "Silence"}


def _layer_cls(type_name: str) -> Any:
    from caffeport.layers.base import layer_class

    return layer_class(type_name)


def _is_data(lp: caffe_pb2.LayerParameter) -> bool:
    cls = _layer_cls(lp.type)
    if cls is not None:
        return bool(cls.is_data)
    return lp.type.endswith("Data") or lp.type == "Python" and not lp.bottom


def _is_loss(lp: caffe_pb2.LayerParameter) -> bool:
    cls = _layer_cls(lp.type)
    if cls is not None:
        return bool(cls.is_loss)
    return lp.type.endswith("Loss")


# --------------------------------------------------------------------------------------------------
# data layer -> input shape
# --------------------------------------------------------------------------------------------------
def _first_datum_shape(lp: caffe_pb2.LayerParameter, root: Path) -> tuple[int, int, int] | None:
    """(C, H, W) of the first record of a Data layer's LMDB, or None when it cannot be read."""
    dp = lp.data_param
    if not dp.source:
        return None
    path = Path(dp.source) if Path(dp.source).is_absolute() else root / dp.source
    if not path.exists() or dp.backend != caffe_pb2.DataParameter.LMDB:
        return None
    try:
        from caffeport.io.lmdb_store import LMDBReader, datum_to_array, parse_datum

        with LMDBReader(path) as reader:
            _, value = reader.peek()
        tp = lp.transform_param
        arr = datum_to_array(parse_datum(value), force_color=tp.force_color, force_gray=tp.force_gray)
    except (CaffeportError, OSError, ImportError, ValueError):
        return None
    c, h, w = arr.shape
    return int(c), int(h), int(w)


def data_input_shapes(lp: caffe_pb2.LayerParameter, root: Path) -> list[tuple[int, ...] | None]:
    """The shapes a data layer's tops would have (None where unknown without the data)."""
    t = lp.type
    tp = lp.transform_param
    crop = int(tp.crop_size)
    if t == "DummyData":
        shapes = [tuple(int(d) for d in s.dim) for s in lp.dummy_data_param.shape]
        return [shapes[min(i, len(shapes) - 1)] if shapes else None for i in range(len(lp.top))]
    if t == "MemoryData":
        mp = lp.memory_data_param
        return [(int(mp.batch_size), int(mp.channels), crop or int(mp.height), crop or int(mp.width))]
    if t == "Input":
        return [tuple(int(d) for d in s.dim) for s in lp.input_param.shape]
    batch, chw = 0, None
    if t == "Data":
        batch = int(lp.data_param.batch_size)
        chw = _first_datum_shape(lp, root)
    elif t == "ImageData":
        ip = lp.image_data_param
        batch = int(ip.batch_size)
        if ip.new_height and ip.new_width:
            chw = (3 if ip.is_color else 1, int(ip.new_height), int(ip.new_width))
    elif t == "WindowData":
        batch = int(lp.window_data_param.batch_size)
        if crop:
            chw = (3, crop, crop)
    elif t == "HDF5Data":
        batch = int(lp.hdf5_data_param.batch_size)
    if chw is not None and crop:
        chw = (chw[0], crop, crop)
    if chw is None or not batch:
        return [None]
    return [(batch, *chw)]


# --------------------------------------------------------------------------------------------------
# graph helpers (blob versions: an in-place layer makes a new version of its blob)
# --------------------------------------------------------------------------------------------------
def _versions(layers: Sequence[caffe_pb2.LayerParameter]) -> tuple[list[list[tuple[str, int]]],
                                                                  list[list[tuple[str, int]]]]:
    """Per layer: the (blob, version) pairs it reads and writes."""
    ver: dict[str, int] = {}
    reads, writes = [], []
    for lp in layers:
        reads.append([(b, ver.get(b, 0)) for b in lp.bottom])
        w = []
        for t in lp.top:
            ver[t] = ver.get(t, 0) + 1
            w.append((t, ver[t]))
        writes.append(w)
    return reads, writes


def _strip_training_fields(lp: caffe_pb2.LayerParameter) -> None:
    """Remove what only training uses: lr/decay multipliers (keeping sharing names), fillers,
    include/exclude rules, loss weights, propagate_down."""
    del lp.include[:]
    del lp.exclude[:]
    del lp.loss_weight[:]
    del lp.propagate_down[:]
    names = [p.name for p in lp.param]
    del lp.param[:]
    if any(names):
        for n in names:
            lp.param.add().name = n
    for fd, sub in lp.ListFields():
        if fd.type != fd.TYPE_MESSAGE or fd.is_repeated or not fd.name.endswith("_param"):
            continue
        for f2, _ in sub.ListFields():
            if f2.type == f2.TYPE_MESSAGE and (f2.name.endswith("filler") or f2.name == "filler"):
                sub.ClearField(f2.name)


def _fresh_name(want: str, used: set[str]) -> str:
    name, i = want, 1
    while name in used:
        i += 1
        name = f"{want}_{i}"
    used.add(name)
    return name


def _drop_label_inputs(layers: Sequence[caffe_pb2.LayerParameter], new_layers: dict[int, caffe_pb2.LayerParameter],
                       orig_reads: Sequence[Sequence[tuple[str, int]]], reads: Sequence[Sequence[tuple[str, int]]],
                       writes: Sequence[Sequence[tuple[str, int]]], dropped: set[int]) -> None:
    """Input-fed nets: an ``Input`` top that was read, but only by layers the deploy form drops (or
    by a loss that became Softmax/Sigmoid, which no longer reads the label), is a label: remove it
    (and its shape); an ``Input`` layer left with no top goes. Unread tops stay (they are outputs)."""
    for i, lp in enumerate(layers):
        if lp.type != "Input" or i not in new_layers:
            continue
        keep = []
        for w in writes[i]:
            readers = [k for k, rs in enumerate(orig_reads) if w in rs]
            live = [k for k in readers if k not in dropped and w in reads[k]]
            keep.append(not readers or bool(live))
        if all(keep):
            continue
        inp = new_layers[i]
        shapes = [caffe_pb2.BlobShape() for _ in inp.top]
        for j in range(len(inp.top)):
            if len(inp.input_param.shape):
                shapes[j].CopyFrom(inp.input_param.shape[min(j, len(inp.input_param.shape) - 1)])
        per_top = len(inp.input_param.shape) > 1
        tops = [t for t, k in zip(inp.top, keep) if k]
        kept_shapes = [s for s, k in zip(shapes, keep) if k]
        del inp.top[:]
        inp.top.extend(tops)
        if per_top:
            del inp.input_param.shape[:]
            for s in kept_shapes:
                inp.input_param.shape.add().CopyFrom(s)
        if not tops:
            dropped.add(i)


def deploy_net(net: caffe_pb2.NetParameter, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
               batch: int | None = None, source: str = "<net>", root: PathLike | None = None,
               keep_training_fields: bool = False) -> caffe_pb2.NetParameter:
    """The deploy form of a train_val/test net (TEST phase), as described in the module doc."""
    from caffeport.graph import filter_net, net_state

    root_path = Path(root) if root is not None else Path.cwd()
    shapes_given = dict(input_shapes or {})
    src = filter_net(net, net_state(caffe_pb2.TEST, 0, ()), source)
    layers = list(src.layer)
    reads, writes = _versions(layers)
    orig_reads = [list(r) for r in reads]
    dropped: set[int] = set()
    dead_blobs: set[tuple[str, int]] = set()
    new_layers: dict[int, caffe_pb2.LayerParameter] = {}
    used_names = {lp.name for lp in layers} | {t for lp in layers for t in lp.top}
    input_tops: list[str] = []
    for i, lp in enumerate(layers):
        if lp.type == "Input":  # already an input: keep it (label-only tops go below), reshape on demand
            inp = caffe_pb2.LayerParameter()
            inp.CopyFrom(lp)
            given = {t: shapes_given.pop(t) for t in lp.top if t in shapes_given}
            if given:
                holder = caffe_pb2.NetParameter()
                holder.layer.add().CopyFrom(inp)
                set_input_shapes(holder, given, source)
                inp.CopyFrom(holder.layer[0])
            if batch:
                for s in inp.input_param.shape:
                    if len(s.dim):
                        s.dim[0] = int(batch)
            new_layers[i] = inp
        elif _is_data(lp):
            shapes = data_input_shapes(lp, root_path)
            inp = caffe_pb2.LayerParameter(name=lp.name, type="Input")
            for j, top in enumerate(lp.top):
                if j > 0 and top not in shapes_given:  # labels and other side tops: dropped
                    dead_blobs.add(writes[i][j])
                    continue
                shape = list(shapes[j]) if j < len(shapes) and shapes[j] is not None else None
                if top in shapes_given:
                    shape = list(shapes_given.pop(top))
                if shape is None:
                    raise CaffeportError(
                        f"{source}: layer '{lp.name}' ({lp.type}): the shape of '{top}' cannot be derived "
                        "(the data source is unreadable or has no fixed size); give it with "
                        f"--input-shape {top}:N,C,H,W")
                if batch:
                    shape[0] = int(batch)
                inp.top.append(top)
                inp.input_param.shape.add().dim.extend(shape)
                input_tops.append(top)
            new_layers[i] = inp
        elif lp.type in _LOSS_TO_OUTPUT:
            out = caffe_pb2.LayerParameter(type=_LOSS_TO_OUTPUT[lp.type])
            out.name = _fresh_name("prob", used_names) if "prob" not in {x.name for x in new_layers.values()} \
                else _fresh_name(f"{lp.name}_prob", used_names)
            out.bottom.append(lp.bottom[0])
            out.top.append(out.name)
            if lp.type == "SoftmaxWithLoss" and lp.HasField("softmax_param"):
                out.softmax_param.CopyFrom(lp.softmax_param)
            new_layers[i] = out
            reads[i] = reads[i][:1]
            writes[i] = [(out.name, 1)]
        elif _is_loss(lp) or lp.type in _NOT_DEPLOY:
            dropped.add(i)
    if shapes_given:
        raise CaffeportError(f"{source}: --input-shape names {', '.join(map(repr, shapes_given))}, which "
                             "no data layer produces")
    # Forward: layers needing a dropped blob go; backward: layers whose every output fed only
    # dropped layers go. Repeat until nothing changes.
    consumers: dict[tuple[str, int], list[int]] = {}
    for j, rs in enumerate(reads):
        for r in rs:
            consumers.setdefault(r, []).append(j)
    changed = True
    while changed:
        changed = False
        for i in dropped:
            dead_blobs.update(writes[i])
        for i in range(len(layers)):
            if i in dropped or (i in new_layers and new_layers[i].type == "Input"):
                continue
            outs = writes[i]
            needs_dead = any(r in dead_blobs for r in reads[i])
            feeds_dropped = bool(outs) and all(
                consumers.get(w) and all(j in dropped for j in consumers[w]) for w in outs)
            if needs_dead or feeds_dropped:
                dropped.add(i)
                changed = True
    _drop_label_inputs(layers, new_layers, orig_reads, reads, writes, dropped)
    input_tops += [t for i, new in new_layers.items() if i not in dropped and new.type == "Input"
                   and layers[i].type == "Input" for t in new.top]
    out = caffe_pb2.NetParameter()
    out.CopyFrom(src)
    del out.layer[:]
    out.ClearField("state")
    for i, lp in enumerate(layers):
        if i in dropped:
            continue
        new = caffe_pb2.LayerParameter()
        new.CopyFrom(new_layers.get(i, lp))
        if not keep_training_fields:
            _strip_training_fields(new)
        out.layer.append(new)
    if not input_tops:
        raise CaffeportError(f"{source}: the net has no data layer to turn into an input")
    return out


# --------------------------------------------------------------------------------------------------
# convolutionalize
# --------------------------------------------------------------------------------------------------
def convolutionalize(net: caffe_pb2.NetParameter, weights: Mapping[str, Sequence[np.ndarray]],
                     bottom_shapes: Mapping[str, Sequence[int]], *, suffix: str = "-conv",
                     layers: Sequence[str] | None = None) -> tuple[caffe_pb2.NetParameter,
                                                                   dict[str, list[np.ndarray]]]:
    """InnerProduct layers recast as Convolution: a 4-D bottom (C, H, W) gives an H x W kernel, a
    2-D bottom (an earlier fc, now 1x1 maps) a 1x1 kernel. ``bottom_shapes`` maps each blob name to
    its shape in the original net; layers are renamed ``name + suffix`` so that the original
    caffemodel cannot be loaded into the new net by mistake. Returns (net, weights)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    new_weights: dict[str, list[np.ndarray]] = {k: [np.asarray(a) for a in v] for k, v in weights.items()}
    wanted = set(layers) if layers is not None else None
    done = []
    for lp in out.layer:
        if lp.type != "InnerProduct" or (wanted is not None and lp.name not in wanted):
            continue
        ip = lp.inner_product_param
        shape = tuple(bottom_shapes[lp.bottom[0]])
        if ip.axis not in (1, -len(shape) + 1):
            raise CaffeportError(f"layer '{lp.name}' (InnerProduct): axis {ip.axis} cannot be convolutionalized")
        if len(shape) == 4:
            c, kh, kw = shape[1], shape[2], shape[3]
        elif len(shape) == 2:
            c, kh, kw = shape[1], 1, 1
        else:
            raise CaffeportError(f"layer '{lp.name}' (InnerProduct): bottom shape {shape} is neither "
                                 "(N, C, H, W) nor (N, C)")
        old_name = lp.name
        conv = caffe_pb2.ConvolutionParameter(num_output=ip.num_output, bias_term=ip.bias_term)
        if kh == kw:
            conv.kernel_size.append(kh)
        else:
            conv.kernel_h, conv.kernel_w = kh, kw
        if ip.HasField("weight_filler"):
            conv.weight_filler.CopyFrom(ip.weight_filler)
        if ip.HasField("bias_filler"):
            conv.bias_filler.CopyFrom(ip.bias_filler)
        lp.ClearField("inner_product_param")
        lp.type = "Convolution"
        lp.convolution_param.CopyFrom(conv)
        lp.name = old_name + suffix
        if old_name in new_weights:
            blobs = new_weights.pop(old_name)
            w = blobs[0].reshape(blobs[0].shape[-2:]) if blobs[0].ndim > 2 else blobs[0]
            if ip.transpose:
                w = w.T
            converted = [np.ascontiguousarray(w.reshape(ip.num_output, c, kh, kw))]
            converted += [np.asarray(b).reshape(-1) for b in blobs[1:]]
            new_weights[lp.name] = converted
        done.append(old_name)
    if wanted is not None and set(wanted) - set(done):
        missing = sorted(set(wanted) - set(done))
        raise CaffeportError(f"no InnerProduct layer named {', '.join(map(repr, missing))}")
    if not done:
        raise CaffeportError("the net has no InnerProduct layer to convolutionalize")
    return out, new_weights


# --------------------------------------------------------------------------------------------------
# truncate
# --------------------------------------------------------------------------------------------------
def truncate(net: caffe_pb2.NetParameter, blob: str, weights: Mapping[str, Sequence[np.ndarray]] | None = None,
             *, source: str = "<net>") -> tuple[caffe_pb2.NetParameter, dict[str, list[np.ndarray]] | None]:
    """The layers needed to compute ``blob`` (its final, post in-place value), nothing after it; the
    weights restricted to those layers. Returns (net, weights or None)."""
    layers = list(net.layer)
    producers = [i for i, lp in enumerate(layers) if blob in lp.top]
    if not producers:
        blobs = {t for lp in layers for t in lp.top}
        raise CaffeportError(f"{source}: no layer produces a blob named '{blob}'{nearest(blob, blobs)}")
    # Layers can repeat names across phases; walk the dependency graph per (blob, version).
    reads, writes = _versions(layers)
    last = max(producers)
    needed: set[tuple[str, int]] = {w for w in writes[last] if w[0] == blob}
    keep: set[int] = set()
    for i in range(last, -1, -1):
        if any(w in needed for w in writes[i]):
            keep.add(i)
            needed.update(reads[i])
    # Layers that exist only under another phase's rule but write a kept blob (the TRAIN/TEST pair
    # of data layers) stay with their twin.
    kept_tops = {t for i in keep for t in layers[i].top}
    for i in range(last + 1):
        if i not in keep and layers[i].top and (layers[i].include or layers[i].exclude) and \
                set(layers[i].top) <= kept_tops and not layers[i].bottom:
            keep.add(i)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for i in sorted(keep):
        out.layer.add().CopyFrom(layers[i])
    new_weights = None
    if weights is not None:
        names = {layers[i].name for i in keep}
        new_weights = {k: [np.asarray(a) for a in v] for k, v in weights.items() if k in names}
    return out, new_weights


def set_input_shapes(net: caffe_pb2.NetParameter, shapes: Mapping[str, Sequence[int]], source: str) -> None:
    """Overwrite the shapes of Input layer tops named in ``shapes`` (in place)."""
    left = dict(shapes)
    for lp in net.layer:
        if lp.type != "Input":
            continue
        ip = lp.input_param
        for j, top in enumerate(lp.top):
            if top not in left:
                continue
            while len(ip.shape) <= j:
                ip.shape.add().CopyFrom(ip.shape[0] if len(ip.shape) else caffe_pb2.BlobShape())
            del ip.shape[j].dim[:]
            ip.shape[j].dim.extend(int(d) for d in left.pop(top))
    if left:
        inputs = [t for lp in net.layer if lp.type == "Input" for t in lp.top]
        verb = "is" if len(left) == 1 else "are"
        raise CaffeportError(f"{source}: --input-shape names {', '.join(map(repr, left))}, which {verb} "
                             f"not net inputs (inputs: {', '.join(inputs) or 'none'})")
