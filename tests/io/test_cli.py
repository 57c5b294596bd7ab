"""`caffeport info` on every kind of file."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from caffeport.cli import main as cli
from tests.golden import CORPUS, GOLDEN

R = CORPUS / "4_real_caffemodels"


@pytest.mark.parametrize(
    "path,expect",
    [
        (
            R / "everpeace_caffe_2014/examples/cifar10/cifar10_quick_iter_5000.caffemodel",
            ["weights", "145,578 parameters", "(1, 1, 64, 1024)"],
        ),
        (R / "jwcom79_cifar10_hdf5/examples/cifar10/cifar10_quick_iter_5000.caffemodel.h5", ["weights", "(64, 1024)"]),
        (R / "everpeace_caffe_2014/examples/mnist/lenet_iter_10000.solverstate", ["solverstate", "iter 10000"]),
        (
            R / "jwcom79_cifar10_hdf5/examples/cifar10/cifar10_quick_iter_5000.solverstate.h5",
            ["solverstate (HDF5)", "iter 5000"],
        ),
        (R / "jwcom79_cifar10_hdf5/examples/cifar10/mean.binaryproto", ["BlobProto", "(3, 32, 32)"]),
        (R / "everpeace_caffe_2014/examples/mnist/lenet.prototxt", ["net", "Convolution", "InnerProduct", "Input"]),
        (R / "everpeace_caffe_2014/examples/mnist/lenet_solver.prototxt", ["solver", "base_lr", "lr_policy"]),
        (CORPUS / "3_model_zoo/ssd_weiliu89_branch_ssd/data/VOC0712/labelmap_voc.prototxt", ["label map", "aeroplane"]),
        (GOLDEN / "tool_convert_imageset_raw/img_lmdb", ["LMDB", "entries"]),
    ],
    ids=["caffemodel", "caffemodel.h5", "solverstate", "solverstate.h5", "mean", "net", "solver", "labelmap", "lmdb"],
)
def test_info(path, expect):
    assert path.exists(), f"{path} is missing from shared/"
    r = CliRunner().invoke(cli, ["info", str(path)])
    assert r.exit_code == 0, r.output
    for e in expect:
        assert e in r.output


def test_info_errors_cleanly(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text("layer { name: ")
    r = CliRunner().invoke(cli, ["info", str(p)])
    assert r.exit_code == 1 and "bad.prototxt" in r.output and "Traceback" not in r.output
