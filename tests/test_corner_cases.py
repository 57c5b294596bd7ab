# ruff: noqa: E501  (one case per line: prototxt, feeds, numpy reference)
"""Corner cases of Caffe's axis/shape rules across layers, each against numpy: negative axes,
``axis``/``num_axes`` forms of Reshape, empty batches, in-place layers on net inputs (written before
moving on from each rule, as the layer tests are per layer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import caffeport

rng = np.random.default_rng(0)
x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)


def inp(name: str = "data", shape: tuple[int, ...] = (2, 3, 4, 5)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def softmax(a: np.ndarray, ax: int) -> np.ndarray:
    e = np.exp(a - a.max(ax, keepdims=True))
    return e / e.sum(ax, keepdims=True)


CASES: dict[str, tuple[str, dict[str, np.ndarray], Callable[[], Any]]] = {}


def case(name: str, proto: str, feeds: dict[str, np.ndarray], ref: Callable[[], Any]) -> None:
    CASES[name] = (proto, feeds, ref)


case("softmax axis -1", inp() + 'layer { name: "s" type: "Softmax" bottom: "data" top: "s" softmax_param { axis: -1 } }', {"data": x}, lambda: softmax(x, -1))
case("concat axis -1", inp() + inp("b") + 'layer { name: "c" type: "Concat" bottom: "data" bottom: "b" top: "c" concat_param { axis: -1 } }', {"data": x, "b": x*2}, lambda: np.concatenate([x, x*2], -1))
case("slice axis -1", inp() + 'layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { axis: -1 slice_point: 2 } }', {"data": x}, lambda: {"a": x[..., :2], "b": x[..., 2:]})
case("ip axis -1", inp() + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 axis: -1 weight_filler { type: "constant" value: 1 } } }', {"data": x}, lambda: np.repeat(x.sum(-1, keepdims=True), 3, -1))
case("reduction axis -1 sum", inp() + 'layer { name: "r" type: "Reduction" bottom: "data" top: "r" reduction_param { axis: -1 } }', {"data": x}, lambda: x.sum(-1))
case("reduction asum axis 1", inp() + 'layer { name: "r" type: "Reduction" bottom: "data" top: "r" reduction_param { axis: 1 operation: ASUM coeff: 2 } }', {"data": x}, lambda: 2*np.abs(x).reshape(2,-1).sum(1))
case("flatten end_axis -2", inp() + 'layer { name: "f" type: "Flatten" bottom: "data" top: "f" flatten_param { axis: 1 end_axis: -2 } }', {"data": x}, lambda: x.reshape(2, 12, 5))
case("argmax axis -1", inp() + 'layer { name: "a" type: "ArgMax" bottom: "data" top: "a" argmax_param { axis: -1 } }', {"data": x}, lambda: x.argmax(-1)[..., None].astype(np.float32))
case("scale axis -1 bottom 2", inp() + inp("s", (5,)) + 'layer { name: "sc" type: "Scale" bottom: "data" bottom: "s" top: "o" scale_param { axis: -1 } }', {"data": x, "s": np.arange(5, dtype=np.float32)}, lambda: x*np.arange(5))
case("bias axis -2 shape(4,5)", inp() + inp("s", (4,5)) + 'layer { name: "sc" type: "Bias" bottom: "data" bottom: "s" top: "o" bias_param { axis: -2 } }', {"data": x, "s": np.ones((4,5), np.float32)}, lambda: x+1)
case("eltwise prod inplace on input", inp() + inp("b") + 'layer { name: "e" type: "Eltwise" bottom: "data" bottom: "b" top: "data" eltwise_param { operation: PROD } }', {"data": x, "b": x}, lambda: x*x)
case("reshape -1 and 0", inp() + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 0 dim: -1 dim: 5 } } }', {"data": x}, lambda: x.reshape(2, 12, 5))
case("reshape axis 1 num_axes 2", inp() + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 12 } axis: 1 num_axes: 2 } }', {"data": x}, lambda: x.reshape(2, 12, 5))
case("reshape axis -1 num_axes 0", inp() + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 } }', {"data": x}, lambda: x.reshape(2,3,4,5,1))
case("softmax empty batch", inp(shape=(0,3)) + 'layer { name: "s" type: "Softmax" bottom: "data" top: "s" }', {"data": np.zeros((0,3), np.float32)}, lambda: np.zeros((0,3)))
case("ip empty batch", inp(shape=(0,3)) + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 bias_filler { type: "constant" value: 1 } } }', {"data": np.zeros((0,3), np.float32)}, lambda: np.zeros((0,2)))
case("tile axis -1", inp() + 'layer { name: "t" type: "Tile" bottom: "data" top: "t" tile_param { axis: -1 tiles: 2 } }', {"data": x}, lambda: np.tile(x, (1,1,1,2)))
case("crop axis -2", inp() + inp("r", (2,3,2,3)) + 'layer { name: "c" type: "Crop" bottom: "data" bottom: "r" top: "c" crop_param { axis: -2 offset: 1 offset: 2 } }', {"data": x, "r": np.zeros((2,3,2,3),np.float32)}, lambda: x[:, :, 1:3, 2:5])
case("embed", inp("i", (4,)) + 'layer { name: "e" type: "Embed" bottom: "i" top: "e" embed_param { num_output: 2 input_dim: 5 weight_filler { type: "constant" value: 3 } } }', {"i": np.array([0,4,2,1], np.float32)}, lambda: np.full((4,2), 3.0))
case("batchreindex", inp() + inp("i", (3,)) + 'layer { name: "b" type: "BatchReindex" bottom: "data" bottom: "i" top: "o" }', {"data": x, "i": np.array([1,0,1], np.float32)}, lambda: x[[1,0,1]])
case("mvn across", inp() + 'layer { name: "m" type: "MVN" bottom: "data" top: "m" mvn_param { across_channels: true } }', {"data": x}, lambda: (x - x.reshape(2,-1).mean(1)[:,None,None,None]) / (x.reshape(2,-1).std(1)[:,None,None,None] + 1e-9))
case("split of input + inplace relu on input", inp() + 'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\nlayer { name: "p" type: "Power" bottom: "data" top: "p" power_param { scale: 2 } }', {"data": x}, lambda: {"p": 2*np.maximum(x, 0)})
case("prelu channel_shared inplace", inp() + 'layer { name: "r" type: "PReLU" bottom: "data" top: "data" prelu_param { channel_shared: true filler { type: "constant" value: 0.5 } } }', {"data": x}, lambda: np.where(x > 0, x, 0.5*x))
case("elu", inp() + 'layer { name: "r" type: "ELU" bottom: "data" top: "o" elu_param { alpha: 0.5 } }', {"data": x}, lambda: np.where(x > 0, x, 0.5*(np.exp(x)-1)))
case("threshold", inp() + 'layer { name: "r" type: "Threshold" bottom: "data" top: "o" threshold_param { threshold: 0.1 } }', {"data": x}, lambda: (x > 0.1).astype(np.float32))
case("exp base", inp() + 'layer { name: "r" type: "Exp" bottom: "data" top: "o" exp_param { base: 2 scale: 0.5 shift: 1 } }', {"data": x}, lambda: 2 ** (1 + 0.5*x))
case("log base", inp() + 'layer { name: "r" type: "Log" bottom: "data" top: "o" log_param { base: 10 scale: 2 shift: 5 } }', {"data": x}, lambda: np.log10(5 + 2*x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_corner_case(name: str, tmp_path: Path) -> None:
    proto, feeds, ref = CASES[name]
    (tmp_path / "n.prototxt").write_text(proto)
    net = caffeport.Net(str(tmp_path / "n.prototxt"), None, caffeport.TEST)
    for k, v in feeds.items():
        net.blobs[k].reshape(*v.shape)
        net.blobs[k].data[...] = v
    out = net.forward()
    want = ref()
    if not isinstance(want, dict):
        assert len(out) == 1, sorted(out)
        want = {next(iter(out)): want}
    for k, v in want.items():
        assert out[k].shape == np.shape(v), (k, out[k].shape, np.shape(v))
        np.testing.assert_allclose(out[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
