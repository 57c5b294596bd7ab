"""Shared helpers for the corpus tests: deploy-net discovery, shrinking inputs, OpenCV's Caffe importer."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from caffeport.io import read_net
from caffeport.net import Net
from caffeport.proto import caffe_pb2
from tests.golden import CORPUS

REAL = CORPUS / "4_real_caffemodels"


def cv2_caffe():
    """``cv2`` when it still has the Caffe importer (OpenCV 4.x; 5.0 dropped ``readNetFromCaffe``), else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2 if hasattr(cv2.dnn, "readNetFromCaffe") else None


CV2_MISSING = ("OpenCV's Caffe importer is missing (cv2.dnn.readNetFromCaffe was removed in OpenCV 5): "
               "install opencv-python-headless<5 to run the OpenCV comparisons")


def read_quiet(path: Path) -> caffe_pb2.NetParameter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_net(path)


def deploy_nets() -> list[Path]:
    """Every corpus prototxt that reads as a net with an ``Input`` layer (``input``/``input_dim``/
    ``input_shape`` fields of V0/V1/V2 nets are upgraded to one by ``read_net``)."""
    out = []
    for p in sorted(CORPUS.rglob("*.prototxt")):
        if "solver" in p.name:
            continue
        try:
            msg = read_quiet(p)
        except Exception:
            continue  # a solver, a label map...
        if any(lp.type == "Input" for lp in msg.layer):
            out.append(p)
    return out


def with_inputs(msg: caffe_pb2.NetParameter, shapes: Mapping[str, Sequence[int]]) -> caffe_pb2.NetParameter:
    """A copy of ``msg`` whose Input layer tops have the given shapes."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(msg)
    for lp in out.layer:
        if lp.type != "Input":
            continue
        ip = lp.input_param
        for j, top in enumerate(lp.top):
            if top not in shapes:
                continue
            while len(ip.shape) <= j:
                ip.shape.add().CopyFrom(ip.shape[0])
            del ip.shape[j].dim[:]
            ip.shape[j].dim.extend(int(d) for d in shapes[top])
    return out


def input_shapes(msg: caffe_pb2.NetParameter) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for lp in msg.layer:
        if lp.type == "Input":
            ip = lp.input_param
            for j, top in enumerate(lp.top):
                s = ip.shape[j] if j < len(ip.shape) else ip.shape[0]
                shapes[top] = tuple(int(d) for d in s.dim)
    return shapes


def build(path: Path, shapes: Mapping[str, Sequence[int]] | None = None, weights: Path | None = None) -> Net:
    """A TEST-phase Net of the prototxt at ``path``, its inputs reshaped to ``shapes``."""
    msg = read_quiet(path)
    if shapes:
        msg = with_inputs(msg, shapes)
    net = Net(msg, weights, root=path.resolve().parent)
    net.source = str(path)
    return net


def mflops(net: Net) -> float:
    """Multiply-adds of Convolution/Deconvolution/InnerProduct at the net's shapes, in millions."""
    total = 0
    for p in net._plans:
        t = p.layer.param.type
        if t not in ("Convolution", "Deconvolution", "InnerProduct") or not len(p.layer.blobs):
            continue
        w = int(p.layer.blobs[0].numel())
        ref = net._shapes[p.bottoms[0] if t == "Deconvolution" else p.tops[0]]
        total += w * int(np.prod(ref[2:])) * ref[0] if len(ref) > 2 and t != "InnerProduct" else w * ref[0]
    return total / 1e6


def n_params(net: Net) -> int:
    return sum(int(b.numel()) for layer in net.layers for b in layer.blobs)


def random_weights(net: Net, seed: int = 0) -> None:
    """Fan-in scaled random weights, so that activations stay O(1) through deep nets; BatchNorm gets a
    positive variance and scale factor 1, Scale/PReLU factors near 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            t = layer.param.type
            blobs = list(layer.blobs)
            if t == "BatchNorm" and len(blobs) == 3:
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g) * 0.5)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=g) + 0.5)
                blobs[2].fill_(1.0)
                continue
            for p in blobs:
                if p.dim() >= 2:
                    fan_in = int(np.prod(p.shape[1:]))
                    if t == "Deconvolution":
                        fan_in = int(p.shape[0] * np.prod(p.shape[2:]))
                    p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
                else:
                    base = 1.0 if t in ("Scale", "PReLU") else 0.0
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + base)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| over the reference's magnitude (max |ref|, at least 1e-6)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        if ours.size != ref.size:
            return float("inf")
        ours = ours.reshape(ref.shape)
    if ref.size == 0:
        return 0.0
    return float(np.abs(ours - ref).max() / max(float(np.abs(ref).max()), 1e-6))


def producer(net: Net, blob: str) -> tuple[str, int] | None:
    """(layer name, top index) of the last layer writing ``blob`` (in-place layers included), skipping
    the auto-inserted Split layers."""
    found = None
    for p in net._plans:
        if p.layer.param.type == "Split":
            continue
        for j, t in enumerate(p.tops):
            if t == blob:
                found = (p.layer.name, j)
    return found


def cv_forward(cv2, prototxt: Path, caffemodel: Path | None, feeds: Mapping[str, np.ndarray],
               layer_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run OpenCV's Caffe importer (reference backend, no Winograd) and return the first output of
    each named layer."""
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel)) if caffemodel else \
        cv2.dnn.readNetFromCaffe(str(prototxt))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    if hasattr(cv_net, "enableWinograd"):
        cv_net.enableWinograd(False)
    for name, x in feeds.items():
        cv_net.setInput(np.ascontiguousarray(x, dtype=np.float32), name)
    outs = cv_net.forward(list(layer_names))
    return {n: np.array(o) for n, o in zip(layer_names, outs)}


def cv_cannot_load(cv2, prototxt: Path) -> str | None:
    """Why OpenCV's Caffe importer cannot read the net definition (None when it can)."""
    try:
        cv2.dnn.readNetFromCaffe(str(prototxt))
    except cv2.error as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        return "OpenCV: " + (" ".join(lines[-3:])[:200] if lines else "cannot load")
    return None
