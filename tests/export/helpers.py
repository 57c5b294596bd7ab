"""Small helpers for the export tests: nets from text, FLOP estimates, corpus deploy nets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from caffeport.io.prototxt import parse_net_text
from caffeport.net import Net
from tests.golden import CORPUS


def net_from_text(text: str, seed: int | None = 0) -> Net:
    """A TEST-phase Net from prototxt text, with random well-scaled weights."""
    from caffeport.export.common import randomize_weights

    net = Net(parse_net_text(text))
    if seed is not None:
        randomize_weights(net, seed)
    return net


def mflops(net: Net) -> float:
    """Multiply-adds of the weighted layers at the net's input shapes, in millions (x2 for FLOPs)."""
    total = 0
    for p in net._plans:
        layer = p.layer
        if not len(layer.blobs) or not p.tops:
            continue
        w = layer.blobs[0]
        out = net._shapes[p.tops[0]]
        if layer.param.type in ("Convolution", "InnerProduct"):
            total += int(w.numel()) * int(np.prod(out[2:])) * out[0] if len(out) > 2 else int(w.numel()) * out[0]
        elif layer.param.type == "Deconvolution":
            inp = net._shapes[p.bottoms[0]]
            total += int(w.numel()) * int(np.prod(inp[2:])) * inp[0]
    return 2 * total / 1e6


def corpus_deploy_nets() -> list[Path]:
    """Every prototxt in the corpus that reads, has Input layers and no data/loss layers."""
    from caffeport.export.common import is_deploy
    from caffeport.io import read_net

    out = []
    for p in sorted(CORPUS.rglob("*.prototxt")):
        if "solver" in p.name:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                msg = read_net(p)
            except Exception:
                continue
        types = [lp.type for lp in msg.layer]
        if "Input" not in types or any(t.endswith("Data") for t in types):
            continue
        try:
            if not is_deploy(msg):
                continue
        except Exception:
            continue
        out.append(p)
    return out
