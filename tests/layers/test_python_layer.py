"""The Python layer: pycaffe's interface (param_str, phase, blobs, reshape/forward/backward), the
user's backward driving autograd, parameter blobs, and errors. References are numpy formulas."""

from __future__ import annotations

import itertools
import textwrap

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.layers.base import TRAIN, BuildContext, layer_class
from caffeport.proto import caffe_pb2

_ids = itertools.count()

SCALE_MODULE = """
import json
import numpy as np
import caffe


class Scale(caffe.Layer):
    def setup(self, bottom, top):
        p = json.loads(self.param_str)
        self.k = float(p["k"])
        self.blobs.add_blob(*bottom[0].data.shape[1:])
        self.blobs[0].data[...] = 2.0
        self.setup_phase = self.phase
        self.train_const = caffe.TRAIN

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
        top[1].reshape(1)

    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data * self.blobs[0].data
        top[1].data[...] = bottom[0].data.sum()

    def backward(self, top, propagate_down, bottom):
        self.seen_propagate = list(propagate_down)
        self.blobs[0].diff[...] = (self.k * bottom[0].data * top[0].diff).sum(0)
        if propagate_down[0]:
            bottom[0].diff[...] = self.k * self.blobs[0].data * top[0].diff + top[1].diff


class Tripled(caffe.Layer):
    '''Identity forward with a deliberately non-autograd backward (3x).'''
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 3 * top[0].diff


class Broken(caffe.Layer):
    def setup(self, bottom, top):
        raise ValueError("bad param_str")
"""


def write_module(tmp_path, text=SCALE_MODULE):
    name = f"cp_test_pylayer_{next(_ids)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    return name


def make(tmp_path, module, cls, bottom_shapes, ntop=1, param_str="", phase=TRAIN):
    lp = caffe_pb2.LayerParameter()
    lp.name = "py"
    lp.type = "Python"
    text_format.Merge(f'python_param {{ module: "{module}" layer: "{cls}" }}', lp)
    lp.python_param.param_str = param_str
    lp.bottom.extend(f"b{i}" for i in range(len(bottom_shapes)))
    lp.top.extend(f"t{i}" for i in range(ntop))
    return layer_class("Python")(lp, bottom_shapes, BuildContext(phase=phase, root=tmp_path, allow_python_layers=True))


def test_forward_backward_params_and_pycaffe_attributes(tmp_path):
    mod = write_module(tmp_path)
    layer = make(tmp_path, mod, "Scale", [(2, 3)], ntop=2, param_str='{"k": 1.5}')
    assert layer.obj.setup_phase == TRAIN and layer.obj.train_const == TRAIN
    assert [tuple(p.shape) for p in layer.blobs] == [(3,)]
    assert layer.top_shapes([(2, 3)]) == [(2, 3), (1,)]
    assert layer.top_shapes([(4, 3)]) == [(4, 3), (1,)]

    # Weights loaded from a caffemodel are what the user code reads.
    w = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    layer.load_blobs([w])
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    xt = torch.tensor(x, requires_grad=True)
    y, s = layer(xt)
    np.testing.assert_allclose(y.detach().numpy(), 1.5 * x * w, rtol=1e-6)
    np.testing.assert_allclose(s.detach().numpy(), [x.sum()], rtol=1e-6)

    gy = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]], dtype=np.float32)
    torch.autograd.backward([y, s], [torch.tensor(gy), torch.tensor([0.75])])
    np.testing.assert_allclose(xt.grad.numpy(), 1.5 * w * gy + 0.75, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), (1.5 * x * gy).sum(0), rtol=1e-6)
    assert layer.obj.seen_propagate == [True]


def test_user_backward_is_the_gradient_even_when_not_autograds(tmp_path):
    mod = write_module(tmp_path)
    layer = make(tmp_path, mod, "Tripled", [(4,)])
    x = torch.tensor(np.linspace(-1, 1, 4, dtype=np.float32), requires_grad=True)
    out = layer(x)
    np.testing.assert_array_equal(out.detach().numpy(), x.detach().numpy())
    out.backward(torch.ones(4))
    np.testing.assert_array_equal(x.grad.numpy(), np.full(4, 3.0, np.float32))


def test_finite_difference_of_scale_layer(tmp_path):
    mod = write_module(tmp_path)
    layer = make(tmp_path, mod, "Scale", [(2, 2)], ntop=2, param_str='{"k": -0.5}')
    x = torch.tensor(np.array([[0.3, -1.2], [2.0, 0.7]], dtype=np.float32), requires_grad=True)
    wy = torch.tensor([[1.0, -2.0], [0.5, 3.0]])

    def f():
        y, s = layer(x)
        return (y * wy).sum() + 2 * s.sum()

    f().backward()
    eps = 1e-2
    num = np.zeros((2, 2))
    with torch.no_grad():
        for i in range(4):
            flat = x.data.view(-1)
            old = flat[i].item()
            flat[i] = old + eps
            fp = float(f())
            flat[i] = old - eps
            fm = float(f())
            flat[i] = old
            num.reshape(-1)[i] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(x.grad.numpy(), num, rtol=1e-3, atol=1e-3)


def test_no_propagate_down_for_detached_bottom(tmp_path):
    mod = write_module(tmp_path)
    layer = make(tmp_path, mod, "Scale", [(1, 2)], ntop=2, param_str='{"k": 1}')
    y, _ = layer(torch.ones(1, 2))  # bottom needs no grad, the parameter does
    y.sum().backward()
    assert layer.obj.seen_propagate == [False]
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), [1.0, 1.0])


def test_errors(tmp_path):
    mod = write_module(tmp_path)
    with pytest.raises(CaffeportError, match="not found"):
        make(tmp_path, "cp_no_such_module_xyz", "Layer", [(1,)])
    with pytest.raises(CaffeportError, match="Scale"):
        make(tmp_path, mod, "Scal", [(1,)])  # did you mean 'Scale'
    # the user's exception reaches the caller as itself (pycaffe), with a note naming the layer
    with pytest.raises(ValueError, match="bad param_str") as err:
        make(tmp_path, mod, "Broken", [(1,)])
    assert not isinstance(err.value, CaffeportError)
    assert any("Broken.setup()" in n for n in err.value.__notes__)
    lp = caffe_pb2.LayerParameter(name="py", type="Python", bottom=["b"], top=["t"])
    with pytest.raises(CaffeportError, match="python_param.module"):
        layer_class("Python")(lp, [(1,)], BuildContext(root=tmp_path, allow_python_layers=True))
