"""Helpers shared by the exporters: building a deploy ``Net`` from a file, test weights."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2
from caffeport.surgery import set_input_shapes  # noqa: F401  (re-exported: export code and tests use it here)

PathLike = str | os.PathLike


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["data:1,3,227,227", ...]`` -> ``{"data": (1, 3, 227, 227)}``."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.partition(":")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise CaffeportError(f"--input-shape {spec!r}: expected NAME:D0,D1,... with positive dims "
                                 "(e.g. data:1,3,227,227)")
        out[name] = shape
    return out


def is_deploy(net: caffe_pb2.NetParameter) -> bool:
    """True when no layer is a data source or a loss/accuracy layer (after phase filtering)."""
    from caffeport.layers.base import layer_class

    for lp in net.layer:
        cls = layer_class(lp.type)
        if cls is not None and (cls.is_data or cls.is_loss) or lp.type == "Accuracy":
            return False
    return True


def load_deploy_net(model: PathLike | caffe_pb2.NetParameter, weights: PathLike | None = None, *,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, batch: int | None = None) -> Any:
    """A TEST-phase ``Net`` in deploy form: a train_val/test net is derived first
    (:func:`caffeport.surgery.deploy_net`)."""
    from caffeport.io import read_net
    from caffeport.net import Net
    from caffeport.surgery import deploy_net

    if isinstance(model, caffe_pb2.NetParameter):
        msg, source, root = model, model.name or "<net>", Path.cwd()
    else:
        path = Path(model)
        if not path.exists():
            raise CaffeportError(f"net file not found: {path}")
        msg, source, root = read_net(path), str(path), path.resolve().parent
    from caffeport.graph import filter_net, net_state

    filtered = filter_net(msg, net_state(caffe_pb2.TEST, 0, ()), source)
    if not is_deploy(filtered):
        msg = deploy_net(msg, input_shapes=input_shapes, batch=batch, source=source, root=root)
    else:
        msg = filtered
        if input_shapes:
            set_input_shapes(msg, input_shapes, source)
        if batch:
            for lp in msg.layer:
                if lp.type == "Input":
                    for s in lp.input_param.shape:
                        if len(s.dim):
                            s.dim[0] = batch
    net = Net(msg, weights, root=root)
    net.source = source
    return net


def randomize_weights(net: Any, seed: int = 0) -> None:
    """Random, well-scaled weights for every param blob (for checks on nets without a caffemodel).

    Fan-in scaled normals; BatchNorm gets positive variances and scale factor 1 so that it stays a
    sane normalisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            blobs = list(layer.blobs)
            if layer.param.type == "BatchNorm" and len(blobs) == 3:
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g) * 0.5)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=g) + 0.5)
                blobs[2].fill_(1.0)
                continue
            if layer.param.type == "BN" and len(blobs) == 4:  # PSPNet: slope, bias, mean, variance
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g) * 0.1 + 1.0)
                blobs[1].copy_(torch.randn(blobs[1].shape, generator=g) * 0.1)
                blobs[2].copy_(torch.randn(blobs[2].shape, generator=g) * 0.5)
                blobs[3].copy_(torch.rand(blobs[3].shape, generator=g) + 0.5)
                continue
            for p in blobs:
                if p.dim() >= 2:
                    fan_in = int(np.prod(p.shape[1:]))
                    if layer.param.type == "Deconvolution":
                        fan_in = int(p.shape[0] * np.prod(p.shape[2:]))
                    p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if layer.param.type in
                            ("Scale", "PReLU", "Normalize") else 0.0))


def layers_without_form(net: Any, forms: Mapping[str, Any]) -> list[str]:
    """'name (Type)' for every non-Input layer of ``net`` whose type is not in ``forms`` (data and
    loss layers have no deploy-time form in any exporter)."""
    bad = []
    for layer in net.layers:
        if layer.is_input:
            continue
        if layer.is_data or layer.is_loss or layer.param.type not in forms:
            bad.append(f"'{layer.name}' ({layer.param.type})")
    return bad
