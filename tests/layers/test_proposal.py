"""py-faster-rcnn's proposal layer, built in: against an independent numpy transcription of
lib/rpn/proposal_layer.py + generate_anchors.py + bbox_transform.py + py_cpu_nms.py (written here from
their description, step by step as the originals do: float32, numpy argsort, greedy NMS), and the
anchor table printed in generate_anchors.py's docstring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.layers.base import TEST, TRAIN, BuildContext, layer_class
from caffeport.layers.proposal import ProposalLayer
from caffeport.proto import caffe_pb2

# generate_anchors()'s documented output
DOC_ANCHORS = np.array([
    [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]], dtype=np.float64)


def _whctrs(a):
    w = a[2] - a[0] + 1
    h = a[3] - a[1] + 1
    return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)


def _mk(ws, hs, xc, yc):
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((xc - 0.5 * (ws - 1), yc - 0.5 * (hs - 1), xc + 0.5 * (ws - 1), yc + 0.5 * (hs - 1)))


def ref_anchors():
    base = np.array([1, 1, 16, 16]) - 1
    w, h, xc, yc = _whctrs(base)
    ratios = np.array([0.5, 1, 2])
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    ratio_anchors = _mk(ws, hs, xc, yc)
    out = []
    for a in ratio_anchors:
        w, h, xc, yc = _whctrs(a)
        scales = 2 ** np.arange(3, 6)
        out.append(_mk(w * scales, h * scales, xc, yc))
    return np.vstack(out)


def ref_nms(dets, thresh):
    x1, y1, x2, y2, sc = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = sc.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def ref_proposals(cls_prob, deltas, im_info, stride, phase):
    pre, post, thr, min_size = (12000, 2000, 0.7, 16) if phase == TRAIN else (6000, 300, 0.7, 16)
    anchors0 = ref_anchors()
    A = anchors0.shape[0]
    scores = cls_prob[:, A:, :, :]
    info = im_info[0, :]
    height, width = scores.shape[-2:]
    sx, sy = np.meshgrid(np.arange(width) * stride, np.arange(height) * stride)
    shifts = np.vstack((sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel())).transpose()
    K = shifts.shape[0]
    anchors = (anchors0.reshape((1, A, 4)) + shifts.reshape((1, K, 4)).transpose((1, 0, 2))).reshape((K * A, 4))
    d = deltas.transpose((0, 2, 3, 1)).reshape((-1, 4))
    scores = scores.transpose((0, 2, 3, 1)).reshape((-1, 1))
    boxes = anchors.astype(d.dtype, copy=False)
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    cx = boxes[:, 0] + 0.5 * w
    cy = boxes[:, 1] + 0.5 * h
    pcx = d[:, 0] * w + cx
    pcy = d[:, 1] * h + cy
    pw = np.exp(d[:, 2]) * w
    ph = np.exp(d[:, 3]) * h
    p = np.zeros(d.shape, dtype=d.dtype)
    p[:, 0], p[:, 1], p[:, 2], p[:, 3] = pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph
    p[:, 0] = np.maximum(np.minimum(p[:, 0], info[1] - 1), 0)
    p[:, 1] = np.maximum(np.minimum(p[:, 1], info[0] - 1), 0)
    p[:, 2] = np.maximum(np.minimum(p[:, 2], info[1] - 1), 0)
    p[:, 3] = np.maximum(np.minimum(p[:, 3], info[0] - 1), 0)
    ws = p[:, 2] - p[:, 0] + 1
    hs = p[:, 3] - p[:, 1] + 1
    ms = min_size * info[2]
    keep = np.where((ws >= ms) & (hs >= ms))[0]
    p, scores = p[keep, :], scores[keep]
    order = scores.ravel().argsort()[::-1][:pre]
    p, scores = p[order, :], scores[order]
    keep = ref_nms(np.hstack((p, scores)), thr)[:post]
    p, scores = p[keep, :], scores[keep]
    rois = np.hstack((np.zeros((p.shape[0], 1), dtype=np.float32), p.astype(np.float32)))
    return rois, scores


def make_python_layer(param_str, shapes, ntop=2, phase=TEST, module="rpn.proposal_layer", layer="ProposalLayer"):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(f'name: "proposal" type: "Python" python_param {{ module: "{module}" layer: "{layer}" }}', lp)
    lp.python_param.param_str = param_str
    lp.bottom.extend(["rpn_cls_prob_reshape", "rpn_bbox_pred", "im_info"])
    lp.top.extend(["rois", "scores"][:ntop])
    return layer_class("Python")(lp, shapes, BuildContext(phase=phase))  # no allow_python_layers


def test_anchors_match_generate_anchors_docstring():
    np.testing.assert_array_equal(ref_anchors(), DOC_ANCHORS)
    layer = make_python_layer("'feat_stride': 16", [(1, 18, 4, 5), (1, 36, 4, 5), (1, 3)])
    assert isinstance(layer, ProposalLayer)
    np.testing.assert_array_equal(layer.anchors.numpy(), DOC_ANCHORS.astype(np.float32))


@pytest.mark.parametrize("phase,hw,scale,seed", [(TEST, (14, 18), 1.0, 0), (TRAIN, (10, 12), 0.6, 1),
                                                  (TEST, (38, 50), 1.6, 2)])
def test_matches_numpy_transcription(phase, hw, scale, seed):
    rng = np.random.default_rng(seed)
    H, W = hw
    cls_prob = rng.random((1, 18, H, W), dtype=np.float32)
    deltas = (rng.standard_normal((1, 36, H, W)) * 0.3).astype(np.float32)
    im_info = np.array([[H * 16 * 0.9, W * 16 * 1.1, scale]], dtype=np.float32)
    layer = make_python_layer("{'feat_stride': 16}", [cls_prob.shape, deltas.shape, im_info.shape], phase=phase)
    rois, scores = layer(torch.from_numpy(cls_prob), torch.from_numpy(deltas), torch.from_numpy(im_info))
    want_rois, want_scores = ref_proposals(cls_prob, deltas, im_info, 16, phase)
    assert rois.shape == want_rois.shape and rois.shape[0] > 10
    np.testing.assert_allclose(rois.numpy(), want_rois, rtol=1e-6, atol=1e-4)  # exp() ulps
    np.testing.assert_array_equal(scores.numpy(), want_scores)


def test_one_top_and_bad_params():
    layer = make_python_layer("'feat_stride': 8", [(1, 18, 3, 3), (1, 36, 3, 3), (1, 3)], ntop=1)
    out = layer(torch.rand(1, 18, 3, 3), torch.zeros(1, 36, 3, 3), torch.tensor([[48.0, 48.0, 1.0]]))
    assert isinstance(out, torch.Tensor) and out.shape[1] == 5
    with pytest.raises(CaffeportError, match="feat_stride"):
        make_python_layer("'stride': 16", [(1, 18, 3, 3), (1, 36, 3, 3), (1, 3)])
    with pytest.raises(CaffeportError, match="single-image"):
        make_python_layer("'feat_stride': 16", [(2, 18, 3, 3), (2, 36, 3, 3), (1, 3)])
    with pytest.raises(CaffeportError, match="bottom 0"):
        make_python_layer("'feat_stride': 16", [(1, 10, 3, 3), (1, 36, 3, 3), (1, 3)])


def test_other_python_modules_need_opt_in(tmp_path):
    with pytest.raises(CaffeportError) as err:
        make_python_layer("", [(1, 18, 3, 3), (1, 36, 3, 3), (1, 3)], module="rpn.other_layer", layer="X")
    msg = str(err.value)
    assert "layer 'proposal'" in msg and "rpn.other_layer" in msg and "allow_python_layers" in msg
    assert "--allow-python-layers" in msg
