"""BVLC python/caffe/test/test_python_layer.py, test_python_layer_with_param_str.py and
test_layer_type_list.py, ported: the layers are pycaffe's own test layers (``import caffe`` inside the
user module resolves to caffeport.compat), the expected values pycaffe's tests assert."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import caffeport.compat as caffe

MODULE = "cp_pycaffe_test_layers"

LAYERS = '''
import caffe


class SimpleLayer(caffe.Layer):
    """A layer that just multiplies by ten"""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 10 * top[0].diff


class ExceptionLayer(caffe.Layer):
    """A layer for checking exceptions from Python"""

    def setup(self, bottom, top):
        raise RuntimeError


class ParameterLayer(caffe.Layer):
    """A layer with one learnable blob whose diff backward sets to 1"""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] = 1


class PhaseLayer(caffe.Layer):
    """A layer for checking attribute `phase`"""

    def setup(self, bottom, top):
        pass

    def reshape(self, bootom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase


class SimpleParamLayer(caffe.Layer):
    """A layer that just multiplies by the numeric value of its param string"""

    def setup(self, bottom, top):
        try:
            self.value = float(self.param_str)
        except ValueError:
            raise ValueError("Parameter string must be a legible float")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.value * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.value * top[0].diff


DATA_LAYER_MAX = 1000
DATA_LAYER_BATCH_SIZE = 10


class SimpleDataLayer(caffe.Layer):
    """Outputs 0, 1, 2, ... DATA_LAYER_MAX-1, 0, 1, ... in batches (pycaffe's older test)"""

    def setup(self, bottom, top):
        self.max = DATA_LAYER_MAX
        self.batch_size = DATA_LAYER_BATCH_SIZE
        top[0].reshape(self.batch_size)
        self.current_index = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        next_index = self.current_index + self.batch_size
        top[0].data[...] = [x % self.max for x in range(self.current_index, next_index)]
        self.current_index = next_index % self.max

    def backward(self, top, propagate_down, bottom):
        pass


class CountingLayer(caffe.Layer):
    """Identity; counts backward calls (for when Caffe calls backward)"""
    calls = 0

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        type(self).calls += 1
        bottom[0].diff[...] = top[0].diff
'''


@pytest.fixture(scope="module")
def layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pylayers")
    (d / f"{MODULE}.py").write_text(LAYERS)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop(MODULE, None)


def _net(layer_dir: Path, text: str, phase: int = caffe.TRAIN, name: str = "net.prototxt") -> caffe.Net:
    p = layer_dir / name
    p.write_text(textwrap.dedent(text).replace("MODULE", MODULE))
    return caffe.Net(str(p), phase)


PYTHON_NET = """name: 'pythonnet' force_backward: true
input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }
layer { type: 'Python' name: 'one' bottom: 'data' top: 'one'
  python_param { module: 'MODULE' layer: 'SimpleLayer' } }
layer { type: 'Python' name: 'two' bottom: 'one' top: 'two'
  python_param { module: 'MODULE' layer: 'SimpleLayer' } }
layer { type: 'Python' name: 'three' bottom: 'two' top: 'three'
  python_param { module: 'MODULE' layer: 'SimpleLayer' } }"""

PARAMETER_NET = """name: 'pythonnet' force_backward: true
input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }
layer { type: 'Python' name: 'layer' bottom: 'data' top: 'top'
  python_param { module: 'MODULE' layer: 'ParameterLayer' } }"""


# --- test_python_layer.py ---------------------------------------------------------------------------
def test_forward(layer_dir: Path) -> None:
    net = _net(layer_dir, PYTHON_NET)
    x = 8
    net.blobs["data"].data[...] = x
    net.forward()
    for y in net.blobs["three"].data.flat:
        assert y == 10**3 * x


def test_backward(layer_dir: Path) -> None:
    net = _net(layer_dir, PYTHON_NET)
    x = 7
    net.blobs["three"].diff[...] = x
    net.backward()
    for y in net.blobs["data"].diff.flat:
        assert y == 10**3 * x


def test_reshape(layer_dir: Path) -> None:
    net = _net(layer_dir, PYTHON_NET)
    s = 4
    net.blobs["data"].reshape(s, s, s, s)
    net.forward()
    for blob in net.blobs.values():
        for d in blob.data.shape:
            assert s == d


def test_exception(layer_dir: Path) -> None:
    with pytest.raises(RuntimeError):  # the layer's own exception type, as in pycaffe
        _net(layer_dir, """name: 'pythonnet' force_backward: true
        input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }
        layer { type: 'Python' name: 'layer' bottom: 'data' top: 'top'
          python_param { module: 'MODULE' layer: 'ExceptionLayer' } }""", caffe.TEST, "exc.prototxt")


def test_parameter(layer_dir: Path, tmp_path: Path) -> None:
    net = _net(layer_dir, PARAMETER_NET, name="param.prototxt")
    # no loss flows into the layer: force_backward makes Caffe call its backward anyway
    net.forward()
    net.backward()
    layer = net.layers[list(net._layer_names).index("layer")]
    assert layer.blobs[0].data[0] == 0
    assert layer.blobs[0].diff[0] == 1
    layer.blobs[0].data[0] += layer.blobs[0].diff[0]
    assert layer.blobs[0].data[0] == 1
    # saving and loading
    caffemodel_file = str(tmp_path / "param.caffemodel")
    net.save(caffemodel_file)
    layer.blobs[0].data[0] = -1
    assert layer.blobs[0].data[0] == -1
    net.copy_from(caffemodel_file)
    assert layer.blobs[0].data[0] == 1
    # weight sharing
    net2 = caffe.Net(str(layer_dir / "param.prototxt"), caffe.TRAIN)
    net2.share_with(net)
    layer2 = net2.layers[list(net2._layer_names).index("layer")]
    assert layer2.blobs[0].data[0] == 1


def test_phase(layer_dir: Path) -> None:
    for phase in caffe.TRAIN, caffe.TEST:
        net = _net(layer_dir, """name: 'pythonnet' force_backward: true
        layer { type: 'Python' name: 'layer' top: 'phase'
          python_param { module: 'MODULE' layer: 'PhaseLayer' } }""", phase, "phase.prototxt")
        assert net.forward()["phase"] == phase


def test_data_forward(layer_dir: Path) -> None:
    net = _net(layer_dir, """name: 'pythondatanet'
    layer { type: 'Python' name: 'pythondata' top: 'pythondata'
      python_param { module: 'MODULE' layer: 'SimpleDataLayer' } }""", name="data.prototxt")
    view = net.blobs["pythondata"].data
    for it in range(25):
        net.forward()
        start = (it * 10) % 1000
        expected = [x % 1000 for x in range(start, start + 10)]
        assert np.all(net.blobs["pythondata"].data == expected)
        assert np.all(view == expected)  # the view taken before the first forward stays live


# --- when Caffe calls a Python layer's backward -----------------------------------------------------
COUNT_NET = """name: 'count' {force}
input: 'data' input_shape {{ dim: 2 dim: 3 }}
layer {{ type: 'Python' name: 'c' bottom: 'data' top: 'c'
  python_param {{ module: 'MODULE' layer: 'CountingLayer' }} }}
layer {{ type: 'InnerProduct' name: 'ip' bottom: 'c' top: 'ip'
  inner_product_param {{ num_output: 1 weight_filler {{ type: 'constant' value: 1 }} }} }}
{loss}"""


@pytest.mark.parametrize("force,loss,called", [
    (True, False, True),    # force_backward: every layer's backward runs
    (False, True, False),   # under a loss, but nothing below needs a diff: Caffe skips it
    (False, False, False),  # no loss, no params below: nothing needs it
])
def test_backward_called_when_caffe_calls_it(layer_dir: Path, force: bool, loss: bool, called: bool) -> None:
    import importlib

    mod = importlib.import_module(MODULE)
    text = COUNT_NET.format(force="force_backward: true" if force else "",
                            loss="layer { type: 'Reduction' name: 'l' bottom: 'ip' top: 'l' loss_weight: 1 }"
                            if loss else "")
    net = _net(layer_dir, text, name=f"count_{force}_{loss}.prototxt")
    mod.CountingLayer.calls = 0
    net.forward(data=np.ones((2, 3), np.float32))
    net.backward()
    assert (mod.CountingLayer.calls == 1) is called


# --- test_python_layer_with_param_str.py ------------------------------------------------------------
PARAM_STR_NET = """name: 'pythonnet' force_backward: true
input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }
layer { type: 'Python' name: 'mul10' bottom: 'data' top: 'mul10'
  python_param { module: 'MODULE' layer: 'SimpleParamLayer' param_str: '10' } }
layer { type: 'Python' name: 'mul2' bottom: 'mul10' top: 'mul2'
  python_param { module: 'MODULE' layer: 'SimpleParamLayer' param_str: '2' } }"""


def test_param_str_forward(layer_dir: Path) -> None:
    net = _net(layer_dir, PARAM_STR_NET, name="ps.prototxt")
    x = 8
    net.blobs["data"].data[...] = x
    net.forward()
    for y in net.blobs["mul2"].data.flat:
        assert y == 2 * 10 * x


def test_param_str_backward(layer_dir: Path) -> None:
    net = _net(layer_dir, PARAM_STR_NET, name="ps.prototxt")
    x = 7
    net.blobs["mul2"].diff[...] = x
    net.backward()
    for y in net.blobs["data"].diff.flat:
        assert y == 2 * 10 * x


def test_bad_param_str_raises_the_layers_value_error(layer_dir: Path) -> None:
    with pytest.raises(ValueError, match="legible float"):
        _net(layer_dir, PARAM_STR_NET.replace("'10'", "'ten'"), name="ps_bad.prototxt")


# --- test_layer_type_list.py ------------------------------------------------------------------------
def test_standard_types() -> None:
    for type_name in ["Data", "Convolution", "InnerProduct", "Python"]:
        assert type_name in caffe.layer_type_list(), f"{type_name} not in layer_type_list()"
