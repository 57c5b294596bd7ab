"""Text nets and solvers: the whole corpus parses; fork spellings; errors; round trips; paths."""

from __future__ import annotations

import warnings

import pytest
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.io import CaffeportWarning, read_net, read_solver, write_net, write_solver
from caffeport.io.prototxt import parse_net_text, parse_text, sniff_text_kind
from caffeport.proto import caffe_pb2
from tests.golden import CORPUS

TEXT_FILES = sorted(CORPUS.rglob("*.prototxt")) + sorted(CORPUS.rglob("*.pt"))


def _manifest_notes() -> dict[str, str]:
    notes = {}
    for line in (CORPUS / "MANIFEST.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[0].endswith((".prototxt", ".pt")):
            notes[cells[0]] = cells[-1]
    return notes


NOTES = _manifest_notes()


def _ids(paths):
    return [str(p.relative_to(CORPUS)) for p in paths]


def test_corpus_is_there():
    assert len(TEXT_FILES) >= 200


@pytest.mark.parametrize("path", TEXT_FILES, ids=_ids(TEXT_FILES))
def test_corpus_text_file_parses(path):
    rel = str(path.relative_to(CORPUS))
    note = NOTES.get(rel, "")
    kind = sniff_text_kind(path.read_text(errors="replace"))
    if note.startswith("solver"):
        assert kind == "solver"
    elif note.startswith("net"):
        assert kind == "net"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaffeportWarning)  # nothing in the corpus needs the fallback
        if kind == "solver":
            s = read_solver(path, resolve_paths=False)
            assert not s.HasField("solver_type")
        elif kind == "labelmap":
            lm = parse_text(path.read_text(), caffe_pb2.LabelMap(), str(path))
            assert len(lm.item) > 1
        else:
            net = read_net(path)
            assert len(net.layer) > 0
            assert len(net.layers) == 0 and len(net.input) == 0 and len(net.input_dim) == 0
            assert all(lp.type for lp in net.layer)
            if "V1" in note or "V0" in note:
                # upgraded: no V1 enum spelling survives
                assert all(not lp.type.isupper() or lp.type in ("LRN", "MVN", "BNLL") for lp in net.layer)
            if "input:input_dim" in note or "input:input_shape" in note:
                assert net.layer[0].type == "Input"


def test_corpus_has_v0_and_v1_nets():
    assert sum("V0" in n for n in NOTES.values()) >= 1
    assert sum("net V1" in n for n in NOTES.values()) >= 10


def test_v1_corpus_net_upgrades_params():
    p = CORPUS / "4_real_caffemodels/everpeace_caffe_2014/examples/cifar10/cifar10_quick_train_test.prototxt"
    net = read_net(p)
    conv1 = next(lp for lp in net.layer if lp.name == "conv1")
    assert conv1.type == "Convolution"
    assert [s.lr_mult for s in conv1.param] == [1.0, 2.0]


def test_fork_fields_parse():
    net = read_net(CORPUS / "3_model_zoo/py_faster_rcnn/models/pascal_voc/VGG16/faster_rcnn_end2end/train.prototxt")
    roi = next(lp for lp in net.layer if lp.type == "ROIPooling")
    assert (roi.roi_pooling_param.pooled_h, roi.roi_pooling_param.pooled_w) == (7, 7)
    assert roi.roi_pooling_param.spatial_scale == pytest.approx(0.0625)
    sl1 = [lp for lp in net.layer if lp.type == "SmoothL1Loss"]
    assert any(lp.HasField("smooth_l1_loss_param") for lp in sl1)
    ssd = read_net(CORPUS / "3_model_zoo/mobilenet_ssd_chuanqi305/MobileNetSSD_deploy.prototxt")
    perm = next(lp for lp in ssd.layer if lp.type == "Permute")
    assert list(perm.permute_param.order) == [0, 2, 3, 1]
    det = next(lp for lp in ssd.layer if lp.type == "DetectionOutput")
    assert det.detection_output_param.nms_param.nms_threshold == pytest.approx(0.45)


def test_fork_fields_are_wire_compatible():
    """Fork fields use the forks' numbers (so binary files written by the forks decode)."""
    f = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert f["roi_pooling_param"].number == 8266711
    assert f["smooth_l1_loss_param"].number == 8266712
    assert f["permute_param"].number == 202 and f["prior_box_param"].number == 203
    assert f["norm_param"].number == 206 and f["detection_output_param"].number == 204
    assert f["shuffle_channel_param"].number == 164
    numbers = [x.number for x in caffe_pb2.LayerParameter.DESCRIPTOR.fields]
    assert len(numbers) == len(set(numbers))
    # every BVLC field keeps its number (spot checks from BVLC caffe.proto)
    assert f["clip_param"].number == 148 and f["input_param"].number == 143 and f["embed_param"].number == 137


POOL = """layer {{ name: "p" type: "Pooling" bottom: "x" top: "y"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 {extra} }} }}"""


@pytest.mark.parametrize(
    "extra,mode",
    [("ceil_mode: false", "FLOOR"), ("ceil_mode: true", "CEIL"), ("round_mode: FLOOR", "FLOOR"), ("", "CEIL")],
)
def test_ceil_mode_rewritten(extra, mode):
    net = parse_net_text(POOL.format(extra=extra))
    assert net.layer[0].pooling_param.round_mode == caffe_pb2.PoolingParameter.RoundMode.Value(mode)


def test_ceil_mode_in_comment_untouched():
    net = parse_net_text(POOL.format(extra="# ceil_mode: false\n"))
    assert net.layer[0].pooling_param.round_mode == caffe_pb2.PoolingParameter.CEIL


def test_unknown_param_block_dropped_with_warning():
    text = """layer { name: "a" type: "Input" top: "x" input_param { shape { dim: 1 } } }
layer { name: "mystery" type: "FancyOp" bottom: "x" top: "y"
  fancy_op_param { alpha: 2 nested { beta: "}" } }
  propagate_down: true
}"""
    with pytest.warns(CaffeportWarning, match=r"layer 'mystery'.*fancy_op_param"):
        net = parse_net_text(text, "f.prototxt")
    assert [lp.type for lp in net.layer] == ["Input", "FancyOp"]
    assert list(net.layer[1].propagate_down) == [True]


def test_malformed_prototxt_reports_file_line_column(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text('name: "x"\nlayer {\n  name: "c"\n  type: "Convolution"\n  convolution_param { num_output: }\n}\n')
    with pytest.raises(CaffeportError, match=r"bad\.prototxt:5:\d+: "):
        read_net(p)
    p.write_text('layer { name: "c" \n')
    with pytest.raises(CaffeportError, match=r"bad\.prototxt:\d+:\d+"):
        read_net(p)


def test_unknown_field_names_nearest(tmp_path):
    p = tmp_path / "typo.prototxt"
    p.write_text('layer { name: "c" type: "Convolution" convolution_param { num_outptu: 3 } }\n')
    with pytest.raises(CaffeportError, match=r"typo\.prototxt:1:\d+.*num_outptu.*did you mean 'num_output'"):
        read_net(p)
    p.write_text('layer { name: "c" type: "Convolution" botom: "x" }\n')
    with pytest.raises(CaffeportError, match=r"did you mean 'bottom'"):
        read_net(p)


def test_unknown_enum_names_nearest(tmp_path):
    p = tmp_path / "enum.prototxt"
    p.write_text('layer { name: "p" type: "Pooling" pooling_param { pool: MAXX } }\n')
    with pytest.raises(CaffeportError, match=r"enum\.prototxt:1:\d+.*MAXX.*did you mean 'MAX'"):
        read_net(p)


def test_duplicate_singular_field_is_an_error():
    with pytest.raises(CaffeportError, match="name"):
        parse_net_text('name: "a"\nname: "b"\n')


def test_missing_file():
    with pytest.raises(CaffeportError, match="not found"):
        read_net(CORPUS / "does_not_exist.prototxt")


@pytest.mark.parametrize("suffix", [".prototxt", ".pt", ".binarynet"])
def test_net_roundtrip(tmp_path, suffix):
    net = read_net(CORPUS / "3_model_zoo/mobilenet_ssd_chuanqi305/MobileNetSSD_deploy.prototxt")
    p = tmp_path / f"n{suffix}"
    write_net(net, p)
    raw = p.read_bytes()
    if suffix == ".binarynet":
        assert caffe_pb2.NetParameter.FromString(raw) == net
    else:
        assert text_format.Parse(raw.decode(), caffe_pb2.NetParameter()) == net
    assert read_net(p) == net


def test_binary_prototxt_autodetected(tmp_path):
    net = read_net(CORPUS / "4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det1.prototxt")
    p = tmp_path / "det1.prototxt.bin"
    p.write_bytes(net.SerializeToString())
    assert read_net(p) == net


def test_corrupt_binary_net(tmp_path):
    p = tmp_path / "x.caffemodel"
    p.write_bytes(b"\x0a\xff\xff\xff\x0f\x00garbage")
    with pytest.raises(CaffeportError, match="x.caffemodel"):
        read_net(p)


# ---- solvers -------------------------------------------------------------------------------------
def _solver(tmp_path, body: str, name: str = "solver.prototxt"):
    p = tmp_path / name
    p.write_text(body)
    return p


def test_solver_defaults_and_relative_paths(tmp_path):
    (tmp_path / "train.prototxt").write_text('name: "t"\n')
    (tmp_path / "init.caffemodel").write_bytes(b"")
    p = _solver(tmp_path, 'net: "train.prototxt"\nweights: "init.caffemodel"\nbase_lr: 0.1\n')
    s = read_solver(p)
    assert s.net == str(tmp_path / "train.prototxt")
    assert list(s.weights) == [str(tmp_path / "init.caffemodel")]
    # Caffe defaults
    assert s.type == "SGD" and s.test_initialization and s.average_loss == 1 and s.iter_size == 1
    assert s.clip_gradients == -1 and s.solver_mode == caffe_pb2.SolverParameter.GPU
    assert s.snapshot_prefix == str(tmp_path / "solver")  # UpgradeSnapshotPrefixProperty


def test_solver_snapshot_prefix_folder(tmp_path):
    (tmp_path / "snaps").mkdir()
    (tmp_path / "n.prototxt").write_text("")
    p = _solver(tmp_path, f'net: "n.prototxt"\nsnapshot_prefix: "{tmp_path / "snaps"}"\n', "my_solver.prototxt")
    assert read_solver(p).snapshot_prefix == str(tmp_path / "snaps" / "my_solver")


def test_solver_missing_absolute_net(tmp_path, monkeypatch):
    p = _solver(tmp_path, 'net: "/home/ubuntu/deeplearning-cats-dogs-tutorial/caffe_models/x.prototxt"\n')
    with pytest.raises(CaffeportError) as e:
        read_solver(p)
    msg = str(e.value)
    assert str(p) in msg and "net" in msg and "/home/ubuntu/deeplearning-cats-dogs-tutorial" in msg
    assert "net=" in msg  # suggests the override
    (tmp_path / "mine.prototxt").write_text("")
    s = read_solver(p, net=tmp_path / "mine.prototxt")
    assert s.net == str(tmp_path / "mine.prototxt")
    monkeypatch.chdir(tmp_path)  # a relative override is relative to the working directory
    assert read_solver(p, net="mine.prototxt").net == str(tmp_path / "mine.prototxt")


def test_tutorial_solver_needs_override():
    p = CORPUS / "1_tutorial_cats_dogs/caffe_models/caffe_model_1/solver_1.prototxt"
    with pytest.raises(CaffeportError, match="solver_1.prototxt.*net"):
        read_solver(p)
    s = read_solver(p, net=CORPUS / "1_tutorial_cats_dogs/caffe_models/caffe_model_1/caffenet_train_val_1.prototxt")
    assert s.net.endswith("caffenet_train_val_1.prototxt")


def test_solver_type_upgrade_and_conflict(tmp_path):
    s = read_solver(_solver(tmp_path, "solver_type: NESTEROV\n"), resolve_paths=False)
    assert s.type == "Nesterov" and not s.HasField("solver_type")
    with pytest.raises(CaffeportError, match="solver_type"):
        read_solver(_solver(tmp_path, 'solver_type: ADAM\ntype: "Adam"\n'), resolve_paths=False)


def test_solver_roundtrip(tmp_path):
    s = read_solver(CORPUS / "3_model_zoo/mobilenet_ssd_chuanqi305/solver_train.prototxt", resolve_paths=False)
    assert s.eval_type == "detection" and s.ap_version == "11point"
    for name in ("s.prototxt", "s.bin"):
        write_solver(s, tmp_path / name)
        assert read_solver(tmp_path / name, resolve_paths=False) == s
