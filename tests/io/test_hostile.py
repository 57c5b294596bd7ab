"""Hostile files: no user code runs unasked, no hang on FIFOs/devices, no allocation driven by declared
sizes, labels out of range and corrupt HDF5/solverstates all give one CaffeportError naming the file
(or layer). Each case is one that used to hang, blow up or crash with a non-caffeport exception."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import caffeport
from caffeport.cli import main as cli
from caffeport.errors import CaffeportError
from caffeport.io import blobs as B
from caffeport.io import load_caffemodel, read_blobproto, read_net, read_solver, read_solverstate, save_caffemodel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _alarm():
    """A hang fails the test after 20 s instead of blocking the suite."""
    def boom(*_):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


READERS = {
    "prototxt": read_net,
    "solver": read_solver,
    "caffemodel": load_caffemodel,
    "binaryproto": read_blobproto,
    "solverstate": read_solverstate,
}


@pytest.mark.parametrize("kind", sorted(READERS))
def test_fifo_device_directory_refused(tmp_path, kind):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, word in ((fifo, "FIFO"), (Path("/dev/zero"), "device"), (tmp_path, "directory")):
        with pytest.raises(CaffeportError, match=word) as err:
            READERS[kind](path)
        assert str(path) in str(err.value)


def test_prototxt_size_limit(tmp_path, monkeypatch):
    p = tmp_path / "big.prototxt"
    p.write_text('name: "x"\n' + "# padding\n" * 2000)
    monkeypatch.setenv("CAFFEPORT_MAX_PROTOTXT_BYTES", "1000")
    with pytest.raises(CaffeportError, match="limit 1000") as err:
        read_net(p)
    assert str(p) in str(err.value)


def _blob_bytes(dims: list[int], n_floats: int) -> bytes:
    shape = b"".join(b"\x08" + B._enc_varint(d) for d in dims)  # BlobShape.dim, unpacked
    data = np.zeros(n_floats, "<f4").tobytes()
    return B._enc_len(7, len(shape)) + shape + B._enc_len(5, len(data)) + data


def _caffemodel_with_blob(path: Path, blob: bytes) -> None:
    layer = B._enc_len(1, 2) + b"ip" + B._enc_len(7, len(blob)) + blob
    path.write_bytes(B._enc_len(100, len(layer)) + layer)


@pytest.mark.parametrize("dims", [[1 << 20, 1 << 20], [1 << 62, 1 << 62, 4], [3, 4]])
def test_caffemodel_declared_sizes_beyond_payload(tmp_path, dims):
    p = tmp_path / "w.caffemodel"
    _caffemodel_with_blob(p, _blob_bytes(dims, 5))
    with pytest.raises(CaffeportError) as err:
        load_caffemodel(p)
    assert str(p) in str(err.value) and "'ip'" in str(err.value)


def test_solverstate_huge_varints(tmp_path):
    p = tmp_path / "s.solverstate"
    blob = _blob_bytes([(1 << 63) - 1, 3], 1)
    p.write_bytes(b"\x08" + B._enc_varint((1 << 64) - 1) + B._enc_len(3, len(blob)) + blob)
    with pytest.raises(CaffeportError, match="solverstate") as err:
        read_solverstate(p)
    assert str(p) in str(err.value)


def test_hdf5_absurd_dataset_not_read(tmp_path):
    import h5py

    p = tmp_path / "w.caffemodel.h5"
    with h5py.File(p, "w") as f:  # 2^31 x 4 float64 = 64 GiB declared, nothing written
        f.create_group("data/ip").create_dataset("0", shape=(1 << 31, 4), dtype="f8", chunks=(1024, 4))
    assert p.stat().st_size < 100_000
    with pytest.raises(CaffeportError) as err:
        load_caffemodel(p)
    assert str(p) in str(err.value)


@pytest.mark.parametrize("kind", ["caffemodel", "solverstate"])
def test_corrupt_hdf5_named(tmp_path, kind):
    p = tmp_path / f"x.{kind}.h5"
    if kind == "caffemodel":
        save_caffemodel({"ip": [np.ones((3, 4), np.float32)]}, tmp_path / "ok.caffemodel")
        from caffeport.io.hdf5 import write_caffemodel_h5

        write_caffemodel_h5({"ip": [np.ones((30, 40), np.float32)]}, p)
        read = load_caffemodel
    else:
        from caffeport.io.hdf5 import write_solverstate_h5

        write_solverstate_h5(p, 5, 1, "x.caffemodel", [np.ones((30, 40), np.float32)])
        read = read_solverstate
    good = p.read_bytes()
    rng = np.random.default_rng(0)
    for trial in range(40):
        bad = bytearray(good)
        if trial % 2:
            bad = bad[: int(rng.integers(8, len(bad)))]
        else:
            for i in rng.integers(8, len(bad), size=8):
                bad[i] = int(rng.integers(0, 256))
        p.write_bytes(bytes(bad))
        try:
            read(p)
        except CaffeportError as e:
            assert str(p) in str(e)


NET_IP = """
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {n} dim: 4 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param {{ num_output: {k} }} }}
"""


@pytest.mark.parametrize("n,k,where", [(2, 2000000000, "layer 'ip'"), (1 << 40, 3, "layer 'data'")])
def test_absurd_allocations_fail_at_build(tmp_path, n, k, where):
    p = tmp_path / "net.prototxt"
    p.write_text(NET_IP.format(n=n, k=k))
    with pytest.raises(CaffeportError, match="limit") as err:
        caffeport.Net(p)
    assert where in str(err.value)


def _loss_net(tmp_path, loss_type, extra=""):
    p = tmp_path / "loss.prototxt"
    p.write_text(f"""
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: 4 dim: 3 }} }} }}
layer {{ name: "y" type: "Input" top: "y" input_param {{ shape {{ dim: 4 }} }} }}
layer {{ name: "loss" type: "{loss_type}" bottom: "x" bottom: "y" top: "loss" {extra} }}
""")
    return caffeport.Net(p)


@pytest.mark.parametrize("loss_type", ["SoftmaxWithLoss", "Accuracy", "MultinomialLogisticLoss", "HingeLoss"])
@pytest.mark.parametrize("bad", [7.0, -1.0, 2.0**63, float("nan")])
def test_label_out_of_range(tmp_path, loss_type, bad):
    net = _loss_net(tmp_path, loss_type)
    x = np.full((4, 3), 0.25, np.float32)
    y = np.array([0, 1, bad, 2], np.float32)
    with pytest.raises(CaffeportError, match=r"out of range \[0, 3\)") as err:
        net.forward(x=x, y=y)
    assert "layer 'loss'" in str(err.value)
    if bad == 7.0:
        assert "label 7 " in str(err.value)
    net.forward(x=x, y=np.array([0, 1, 2, 2], np.float32))  # in range: fine


def test_ignore_label_is_respected(tmp_path):
    net = _loss_net(tmp_path, "SoftmaxWithLoss", "loss_param { ignore_label: -1 }")
    x = np.zeros((4, 3), np.float32)
    out = net.forward(x=x, y=np.array([0, -1, 2, -1], np.float32))
    np.testing.assert_allclose(out["loss"], np.log(3.0), rtol=1e-6)  # two valid labels, uniform softmax
    with pytest.raises(CaffeportError, match="label 5 out of range"):
        net.forward(x=x, y=np.array([0, -1, 5, -1], np.float32))


# --- Python layers: user code only when asked -------------------------------------------------------
MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
import caffe


class Double(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data
"""


_IDS = itertools.count()


def _python_net(tmp_path):
    mod = f"cp_hostile_{os.getpid()}_{next(_IDS)}"
    marker = tmp_path / f"{mod}.imported"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(MODULE.format(marker=str(marker))))
    p = tmp_path / f"{mod}.prototxt"
    p.write_text(f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
layer {{ name: "twice" type: "Python" bottom: "data" top: "out" python_param {{ module: "{mod}" layer: "Double" }} }}
""")
    return p, mod, marker


def test_python_layer_needs_opt_in(tmp_path):
    p, mod, marker = _python_net(tmp_path)
    with pytest.raises(CaffeportError) as err:
        caffeport.Net(p)
    msg = str(err.value)
    assert "layer 'twice'" in msg and mod in msg
    assert "allow_python_layers=True" in msg and "--allow-python-layers" in msg
    with pytest.raises(CaffeportError):
        caffeport.load_module(p)
    assert not marker.exists() and mod not in sys.modules
    net = caffeport.Net(p, allow_python_layers=True)
    assert marker.exists()
    out = net.forward(data=np.ones((2, 3), np.float32))["out"]
    np.testing.assert_array_equal(out, np.full((2, 3), 2.0))


def test_compat_keeps_pycaffe_trust(tmp_path):
    import caffeport.compat as caffe

    p, _, marker = _python_net(tmp_path)
    net = caffe.Net(str(p), caffe.TEST)
    assert marker.exists() and net.forward(data=np.ones((2, 3), np.float32))["out"].sum() == 12


def test_cli_info_never_imports_and_others_need_the_flag(tmp_path):
    p, mod, marker = _python_net(tmp_path)
    r = CliRunner().invoke(cli, ["info", str(p)])
    assert r.exit_code == 0 and "Python" in r.output and "not built" in r.output, r.output
    for args in (["draw", str(p), str(tmp_path / "n.dot")], ["deploy", str(p), "-o", str(tmp_path / "d.prototxt")],
                 ["truncate", str(p), "--blob", "data", "-o", str(tmp_path / "t.prototxt")],
                 ["upgrade", str(p), str(tmp_path / "u.prototxt")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
    r = CliRunner().invoke(cli, ["export-onnx", str(p), "-o", str(tmp_path / "n.onnx")])
    assert r.exit_code == 1 and "--allow-python-layers" in r.output and "'twice'" in r.output
    assert not marker.exists()
    r = CliRunner().invoke(cli, ["time", "--model", str(p), "--iterations", "1", "--allow-python-layers"])
    assert r.exit_code == 0, r.output
    assert marker.exists()
    assert os.environ.get("CAFFEPORT_ALLOW_PYTHON_LAYERS") is None  # the flag does not leak


def test_layers_package_does_not_import_compat():
    for f in (ROOT / "caffeport" / "layers").glob("*.py"):
        assert not re.search(r"import caffeport\.compat|from caffeport\.compat|from caffeport import compat",
                             f.read_text()), f
    code = ("import sys, caffeport.layers.base as b; b.registry(); import caffeport.net; "
            "print('caffeport.compat' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"



@pytest.mark.parametrize("kind", ["ImageData", "HDF5Data"])
def test_fifo_as_list_entry(tmp_path, kind):
    name = "pipe.png" if kind == "ImageData" else "pipe.h5"
    os.mkfifo(tmp_path / name)
    (tmp_path / "list.txt").write_text(f"{name} 0\n" if kind == "ImageData" else f"{name}\n")
    param = ("image_data_param" if kind == "ImageData" else "hdf5_data_param") + ' { source: "list.txt" batch_size: 1 }'
    p = tmp_path / "net.prototxt"
    p.write_text(f'layer {{ name: "data" type: "{kind}" top: "data" top: "label" {param} }}')
    with pytest.raises(CaffeportError, match=name):
        caffeport.Net(p).forward()


def test_fifo_lmdb_data_file(tmp_path):
    (tmp_path / "db").mkdir()
    os.mkfifo(tmp_path / "db" / "data.mdb")
    p = tmp_path / "net.prototxt"
    p.write_text('layer { name: "data" type: "Data" top: "data"\n'
                 '  data_param { source: "db" batch_size: 1 backend: LMDB } }')
    with pytest.raises(CaffeportError, match="LMDB"):
        caffeport.Net(p)


def test_cli_info_on_fifo_and_device(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for path, word in ((tmp_path / "pipe", "FIFO"), (Path("/dev/zero"), "device")):
        r = CliRunner().invoke(cli, ["info", str(path)])
        assert r.exit_code == 1 and word in r.output and str(path) in r.output, r.output
