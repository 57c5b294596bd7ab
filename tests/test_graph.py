"""Phase/level/stage filtering (Caffe's StateMeetsRule) and split insertion (InsertSplits)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.graph import filter_net, insert_splits, net_state
from caffeport.proto import caffe_pb2

NET = """
name: "rules"
layer { name: "always" type: "Input" top: "x" input_param { shape { dim: 1 } } }
layer { name: "train_only" type: "ReLU" bottom: "x" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "x" top: "b" include { phase: TEST } }
layer { name: "not_test" type: "ReLU" bottom: "x" top: "c" exclude { phase: TEST } }
layer { name: "level2" type: "ReLU" bottom: "x" top: "d" include { min_level: 2 } }
layer { name: "upto1" type: "ReLU" bottom: "x" top: "e" include { max_level: 1 } }
layer { name: "stages_ab" type: "ReLU" bottom: "x" top: "f" include { stage: "a" stage: "b" } }
layer { name: "not_b" type: "ReLU" bottom: "x" top: "g" include { not_stage: "b" } }
layer { name: "either" type: "ReLU" bottom: "x" top: "h" include { stage: "a" } include { phase: TRAIN } }
"""


def _names(phase: int, level: int = 0, stages: tuple[str, ...] = ()) -> list[str]:
    net = text_format.Parse(NET, caffe_pb2.NetParameter())
    return [lp.name for lp in filter_net(net, net_state(phase, level, stages)).layer]


def test_phase_rules() -> None:
    assert _names(caffe_pb2.TRAIN) == ["always", "train_only", "not_test", "upto1", "not_b", "either"]
    assert _names(caffe_pb2.TEST) == ["always", "test_only", "upto1", "not_b"]


def test_level_rules() -> None:
    names = _names(caffe_pb2.TEST, level=2)
    assert "level2" in names and "upto1" not in names


def test_stage_rules_need_all_stages_and_no_not_stage() -> None:
    assert "stages_ab" not in _names(caffe_pb2.TEST, stages=("a",))
    names = _names(caffe_pb2.TEST, stages=("a", "b"))
    assert "stages_ab" in names and "not_b" not in names and "either" in names


def test_include_and_exclude_together_is_an_error() -> None:
    net = text_format.Parse(
        'layer { name: "bad" type: "ReLU" include { phase: TRAIN } exclude { phase: TEST } }', caffe_pb2.NetParameter()
    )
    with pytest.raises(CaffeportError, match="bad"):
        filter_net(net, net_state(caffe_pb2.TRAIN))


def test_splits_named_as_caffe() -> None:
    net = text_format.Parse(
        """
        layer { name: "in" type: "Input" top: "x" }
        layer { name: "p" type: "ReLU" bottom: "x" top: "y" }
        layer { name: "q" type: "TanH" bottom: "x" top: "z" }
        layer { name: "r" type: "TanH" bottom: "x" top: "w" }
        """,
        caffe_pb2.NetParameter(),
    )
    out = insert_splits(net)
    assert [lp.name for lp in out.layer] == ["in", "x_in_0_split", "p", "q", "r"]
    split = out.layer[1]
    assert split.type == "Split" and list(split.top) == ["x_in_0_split_0", "x_in_0_split_1", "x_in_0_split_2"]
    assert [lp.bottom[0] for lp in out.layer[2:]] == list(split.top)


def test_loss_weighted_top_with_a_consumer_gets_a_split() -> None:
    net = text_format.Parse(
        """
        layer { name: "in" type: "Input" top: "x" }
        layer { name: "p" type: "TanH" bottom: "x" top: "y" loss_weight: 2 }
        layer { name: "q" type: "TanH" bottom: "y" top: "z" }
        """,
        caffe_pb2.NetParameter(),
    )
    out = insert_splits(net)
    split = out.layer[2]
    assert list(split.top) == ["y_p_0_split_0", "y_p_0_split_1"]
    assert list(split.loss_weight) == [2.0, 0.0]
    assert list(out.layer[1].loss_weight) == []
    assert out.layer[3].bottom[0] == "y_p_0_split_1"
