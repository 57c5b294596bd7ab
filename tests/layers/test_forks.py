"""Fork layers (SSD, ShuffleNet, PSPNet, SegNet): numpy transcriptions of the forks' CPU loops as
references, parameter checks, every corpus deploy net that uses these types, and whole SSD nets
against OpenCV's dnn Caffe importer (an independent implementation of the SSD layers).

The OpenCV comparisons need an OpenCV whose dnn module still reads Caffe files (4.x; OpenCV 5
dropped ``readNetFromCaffe``): requirements-dev.txt pins one, and the tests fail without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from caffeport.errors import CaffeportError
from caffeport.layers.base import TEST, TRAIN
from tests.layers.helpers import fd_check, make

RNG = np.random.default_rng(11)
F = np.float32
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
FORK_TYPES = ("Normalize", "Permute", "PriorBox", "DetectionOutput", "ShuffleChannel",
              "ConvolutionDepthwise", "BN", "Interp", "Upsample")


def run(layer, *arrays: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = layer(*[torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays])
    return out.numpy()


# ---------------------------------------------------------------------------------------------
# Normalize
# ---------------------------------------------------------------------------------------------
def ref_normalize(x: np.ndarray, scale: np.ndarray, across: bool, shared: bool, eps: float):
    """normalize_layer.cpp Forward_cpu, per item, in float64."""
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1).astype(np.float64)
    out = np.empty_like(xs)
    norms = []
    for i in range(n):
        b = xs[i]
        if across:
            nrm = math.sqrt((b * b).sum() + eps)
            t = b / nrm
        else:
            nrm = np.sqrt(eps + (b * b).sum(axis=0))
            t = b / nrm[None, :]
        norms.append(nrm)
        out[i] = t * (scale[0] if shared else scale[:, None])
    return out.reshape(x.shape), norms


def ref_normalize_backward(x, top_diff, scale, across, shared, norms):
    """normalize_layer.cpp Backward_cpu (bottom diff and scale diff), float64."""
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1).astype(np.float64)
    td = top_diff.reshape(n, c, -1).astype(np.float64)
    top, _ = ref_normalize(x, scale, across, shared, 1e-10)
    top = top.reshape(n, c, -1)
    if shared:
        sdiff = np.array((top * td).sum() / scale[0])
    else:
        sdiff = ((top * td).sum(axis=2) / scale[None, :]).sum(axis=0)
    bd = np.empty_like(xs)
    for i in range(n):
        if across:
            a = (xs[i] * td[i]).sum()
            d = (td[i] - xs[i] * a / norms[i] / norms[i]) / norms[i]
        else:
            a = (xs[i] * td[i]).sum(axis=0)
            d = (td[i] - xs[i] * a[None] / (norms[i] ** 2)[None]) / norms[i][None]
        bd[i] = d * (scale[0] if shared else scale[:, None])
    return bd.reshape(x.shape), sdiff


@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_normalize_forward_backward(across: bool, shared: bool) -> None:
    shape = (2, 5, 3, 4)
    layer = make("Normalize", f"norm_param {{ across_spatial: {str(across).lower()} "
                 f"channel_shared: {str(shared).lower()} scale_filler {{ type: 'constant' value: 3 }} }}", [shape])
    assert tuple(layer.blobs[0].shape) == (() if shared else (5,))
    scale = RNG.uniform(0.5, 2.0, size=(1 if shared else 5)).astype(np.float32)
    with torch.no_grad():
        layer.blobs[0].copy_(torch.from_numpy(scale.reshape(layer.blobs[0].shape)))
    x = RNG.standard_normal(shape).astype(np.float32)
    ref, norms = ref_normalize(x, scale.astype(np.float64), across, shared, 1e-10)
    np.testing.assert_allclose(run(layer, x), ref, rtol=1e-5, atol=1e-6)
    # Backward: the fork's Backward_cpu (not the true gradient for a per-channel scale).
    xt = torch.from_numpy(x).requires_grad_(True)
    td = RNG.standard_normal(shape)
    layer(xt).backward(torch.from_numpy(td.astype(np.float32)))
    bd, sd = ref_normalize_backward(x, td, scale.astype(np.float64), across, shared, norms)
    np.testing.assert_allclose(xt.grad.numpy(), bd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.blobs[0].grad.numpy().reshape(-1), sd.reshape(-1), rtol=1e-4, atol=1e-5)


def test_normalize_defaults_and_errors() -> None:
    layer = make("Normalize", "", [(1, 3, 2, 2)])
    assert layer.across_spatial and layer.channel_shared and layer.eps == pytest.approx(1e-10)
    assert float(layer.blobs[0].detach()) == 1.0  # default scale filler: constant 1
    x = RNG.standard_normal((1, 3, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(run(layer, x), x / np.sqrt((x.astype(np.float64) ** 2).sum() + 1e-10), rtol=1e-6)
    with pytest.raises(CaffeportError, match="at least 2 axes"):
        make("Normalize", "", [(4,)])


# ---------------------------------------------------------------------------------------------
# Permute
# ---------------------------------------------------------------------------------------------
def ref_permute(x: np.ndarray, order: list[int]) -> np.ndarray:
    """permute_layer.cpp: top[i] = bottom[sum_j (i_j) * old_steps[order[j]]]."""
    nd = x.ndim
    full = list(order) + [i for i in range(nd) if i not in order]
    top_shape = [x.shape[o] for o in full]
    old_steps = [int(np.prod(x.shape[i + 1:])) for i in range(nd)]
    new_steps = [int(np.prod(top_shape[i + 1:])) for i in range(nd)]
    flat = x.reshape(-1)
    out = np.empty(flat.size, dtype=x.dtype)
    for i in range(flat.size):
        idx, old = i, 0
        for j in range(nd):
            old += (idx // new_steps[j]) * old_steps[full[j]]
            idx %= new_steps[j]
        out[i] = flat[old]
    return out.reshape(top_shape)


@pytest.mark.parametrize("order", [[0, 2, 3, 1], [0, 3], [1, 0, 2], [0, 1, 2, 3], []])
def test_permute(order: list[int]) -> None:
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    params = "permute_param { " + " ".join(f"order: {o}" for o in order) + " }"
    layer = make("Permute", params, [x.shape])
    out = run(layer, x)
    ref = ref_permute(x, order)
    assert out.shape == ref.shape == tuple(layer.top_shapes([x.shape])[0])
    np.testing.assert_array_equal(out, ref)


def test_permute_errors() -> None:
    with pytest.raises(CaffeportError, match="less than the input dimension"):
        make("Permute", "permute_param { order: 0 order: 4 }", [(1, 2, 3, 4)])
    with pytest.raises(CaffeportError, match="duplicate"):
        make("Permute", "permute_param { order: 1 order: 1 }", [(1, 2, 3, 4)])


# ---------------------------------------------------------------------------------------------
# PriorBox
# ---------------------------------------------------------------------------------------------
def ref_priorbox(p: dict, layer_hw: tuple[int, int], img_hw: tuple[int, int]) -> np.ndarray:
    """prior_box_layer.cpp Forward_cpu with C++ float/double promotion, one value at a time."""
    lh, lw = layer_hw
    ih, iw = img_hw
    ars = [1.0]
    for a in p.get("aspect_ratio", []):
        a = float(F(a))
        if any(abs(a - b) < 1e-6 for b in ars):
            continue
        ars.append(a)
        if p.get("flip", True):
            ars.append(float(F(1.0 / a)))
    if p.get("img_size"):
        ih = iw = p["img_size"]
    if p.get("step"):
        sh = sw = F(p["step"])
    else:
        sw, sh = F(F(iw) / F(lw)), F(F(ih) / F(lh))
    off = F(p.get("offset", 0.5))
    mins, maxs = p["min_size"], p.get("max_size", [])
    vals: list[float] = []

    def emit(cx, cy, bw, bh):
        # (center_x - box_width / 2.) / img_width: double arithmetic, stored as float
        vals.extend([F((float(cx) - float(bw) / 2.0) / iw), F((float(cy) - float(bh) / 2.0) / ih),
                     F((float(cx) + float(bw) / 2.0) / iw), F((float(cy) + float(bh) / 2.0) / ih)])

    for h in range(lh):
        for w in range(lw):
            cx = F(F(F(w) + off) * sw)
            cy = F(F(F(h) + off) * sh)
            for s, mn in enumerate(mins):
                mn = int(mn)
                emit(cx, cy, F(mn), F(mn))
                if maxs:
                    mx = int(maxs[s])
                    b = F(math.sqrt(mn * mx))
                    emit(cx, cy, b, b)
                for ar in ars:
                    if abs(ar - 1.0) < 1e-6:
                        continue
                    sq = F(np.sqrt(F(ar)))
                    emit(cx, cy, F(F(mn) * sq), F(F(mn) / sq))
    boxes = np.array(vals, dtype=np.float32)
    if p.get("clip"):
        boxes = np.clip(boxes, 0, 1)
    var = p.get("variance", [0.1])
    variances = np.tile(np.array(var, np.float32), boxes.size // len(var))
    return np.stack([boxes, variances])[None]


PRIOR_CASES = [
    {"min_size": [30.0], "max_size": [60.0], "aspect_ratio": [2.0], "variance": [0.1, 0.1, 0.2, 0.2]},
    {"min_size": [10.0, 16.0, 24.0], "aspect_ratio": [2.0, 3.0], "flip": False, "clip": True,
     "step": 8.0, "variance": [0.1, 0.1, 0.2, 0.2]},
    {"min_size": [60.0, 105.5], "max_size": [105.0, 150.0], "aspect_ratio": [2.0, 3.0, 0.5, 2.0],
     "offset": 0.25, "variance": [0.2]},
    {"min_size": [13.0], "img_size": 300, "clip": True},
]


@pytest.mark.parametrize("p", PRIOR_CASES)
def test_priorbox(p: dict) -> None:
    lines = []
    for k, v in p.items():
        for item in (v if isinstance(v, list) else [v]):
            lines.append(f"{k}: {str(item).lower() if isinstance(item, bool) else item}")
    feat, img = (1, 8, 5, 7), (1, 3, 41, 57)
    layer = make("PriorBox", "prior_box_param { " + " ".join(lines) + " }", [feat, img])
    out = run(layer, np.zeros(feat), np.zeros(img))
    ref = ref_priorbox(p, feat[2:], img[2:])
    assert out.shape == ref.shape == tuple(layer.top_shapes([feat, img])[0])
    np.testing.assert_array_equal(out, ref)
    assert not layer.has_backward


def test_priorbox_errors() -> None:
    with pytest.raises(CaffeportError, match="min_size"):
        make("PriorBox", "prior_box_param { }", [(1, 1, 2, 2), (1, 3, 8, 8)])
    with pytest.raises(CaffeportError, match="greater than min_size"):
        make("PriorBox", "prior_box_param { min_size: 30 max_size: 20 }", [(1, 1, 2, 2), (1, 3, 8, 8)])
    with pytest.raises(CaffeportError, match="exactly 4"):
        make("PriorBox", "prior_box_param { min_size: 3 variance: 0.1 variance: 0.2 }", [(1, 1, 2, 2), (1, 3, 8, 8)])
    with pytest.raises(CaffeportError, match="not both"):
        make("PriorBox", "prior_box_param { min_size: 3 step: 2 step_h: 2 step_w: 3 }", [(1, 1, 2, 2), (1, 3, 8, 8)])


# ---------------------------------------------------------------------------------------------
# DetectionOutput
# ---------------------------------------------------------------------------------------------
def ref_decode(pb, pv, lb, code: str, vit: bool):
    """bbox_util.cpp DecodeBBox for one box, float32 scalars in the fork's order."""
    if vit:
        pv = [F(1)] * 4
    if code == "CORNER":
        if vit:
            return [F(pb[k] + lb[k]) for k in range(4)]
        return [F(pb[k] + F(pv[k] * lb[k])) for k in range(4)]
    pw, ph = F(pb[2] - pb[0]), F(pb[3] - pb[1])
    if code == "CENTER_SIZE":
        pcx, pcy = F(F(pb[0] + pb[2]) / 2), F(F(pb[1] + pb[3]) / 2)
        cx = F(F(F(pv[0] * lb[0]) * pw) + pcx)
        cy = F(F(F(pv[1] * lb[1]) * ph) + pcy)
        w = F(np.exp(F(pv[2] * lb[2])) * pw)
        h = F(np.exp(F(pv[3] * lb[3])) * ph)
        return [F(cx - w / 2), F(cy - h / 2), F(cx + w / 2), F(cy + h / 2)]
    return [F(pb[0] + F(F(pv[0] * lb[0]) * pw)), F(pb[1] + F(F(pv[1] * lb[1]) * ph)),
            F(pb[2] + F(F(pv[2] * lb[2]) * pw)), F(pb[3] + F(F(pv[3] * lb[3]) * ph))]


def ref_size(b) -> np.float32:
    if b[2] < b[0] or b[3] < b[1]:
        return F(0)
    return F(F(b[2] - b[0]) * F(b[3] - b[1]))


def ref_iou(b1, b2) -> np.float32:
    if b2[0] > b1[2] or b2[2] < b1[0] or b2[1] > b1[3] or b2[3] < b1[1]:
        return F(0)
    iw = F(min(b1[2], b2[2]) - max(b1[0], b2[0]))
    ih = F(min(b1[3], b2[3]) - max(b1[1], b2[1]))
    if iw > 0 and ih > 0:
        inter = F(iw * ih)
        return F(inter / F(F(ref_size(b1) + ref_size(b2)) - inter))
    return F(0)


def ref_nms(boxes, scores, score_thr, nms_thr, eta, top_k):
    pairs = [(scores[i], i) for i in range(len(scores)) if scores[i] > F(score_thr)]
    pairs.sort(key=lambda t: -t[0])  # Python's sort is stable, as std::stable_sort
    if top_k > -1:
        pairs = pairs[:top_k]
    kept: list[int] = []
    thr = F(nms_thr)
    for _, idx in pairs:
        keep = all(ref_iou(boxes[idx], boxes[k]) <= thr for k in kept)
        if keep:
            kept.append(idx)
            if eta < 1 and thr > 0.5:
                thr = F(thr * F(eta))
    return kept


def ref_detection_output(loc, conf, prior, num_classes, share, bg, code, vit, keep_top_k, conf_thr,
                         nms_thr, eta, top_k):
    num = loc.shape[0]
    npri = prior.shape[2] // 4
    nloc = 1 if share else num_classes
    pb = prior[0, 0].reshape(npri, 4)
    pv = prior[0, 1].reshape(npri, 4)
    rows_all = []
    kept_total = 0
    for i in range(num):
        lp = loc[i].reshape(npri, nloc, 4)
        cf = conf[i].reshape(npri, num_classes)
        dec = {}
        for c in range(nloc):
            label = -1 if share else c
            if label == bg:
                continue
            dec[label] = [ref_decode(pb[p], pv[p], lp[p, c], code, vit) for p in range(npri)]
        indices = {}
        ndet = 0
        for c in range(num_classes):
            if c == bg:
                continue
            indices[c] = ref_nms(dec[-1 if share else c], list(cf[:, c]), conf_thr, nms_thr, eta, top_k)
            ndet += len(indices[c])
        if keep_top_k > -1 and ndet > keep_top_k:
            sp = [(cf[j, c], c, j) for c in sorted(indices) for j in indices[c]]
            sp.sort(key=lambda t: -t[0])
            new: dict[int, list[int]] = {}
            for _, c, j in sp[:keep_top_k]:
                new.setdefault(c, []).append(j)
            indices = new
            kept_total += keep_top_k
        else:
            kept_total += ndet
        for c in sorted(indices):
            for j in indices[c]:
                rows_all.append([i, c, cf[j, c], *dec[-1 if share else c][j]])
    if kept_total == 0:
        out = np.full((1, 1, num, 7), -1, np.float32)
        out[0, 0, :, 0] = np.arange(num)
        return out
    return np.array(rows_all, np.float32).reshape(1, 1, -1, 7)


def _ssd_inputs(num: int, npri: int, num_classes: int, nloc: int):
    # Priors on a jittered grid (plenty of overlaps), locs small, conf softmax-like without ties.
    ctr = RNG.uniform(0.1, 0.9, size=(npri, 2))
    wh = RNG.uniform(0.05, 0.4, size=(npri, 2))
    pb = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)
    pv = np.tile(np.array([0.1, 0.1, 0.2, 0.2], np.float32), (npri, 1))
    prior = np.stack([pb.reshape(-1), pv.reshape(-1)])[None].astype(np.float32)
    loc = (RNG.standard_normal((num, npri * nloc * 4)) * 0.8).astype(np.float32)
    logits = RNG.standard_normal((num, npri, num_classes)) * 2
    e = np.exp(logits - logits.max(axis=2, keepdims=True))
    conf = (e / e.sum(axis=2, keepdims=True)).reshape(num, -1).astype(np.float32)
    return loc, conf, prior


DET_CASES = [
    dict(num_classes=3, share=True, bg=0, code="CENTER_SIZE", vit=False, keep_top_k=-1, conf_thr=0.2,
         nms_thr=0.45, eta=1.0, top_k=-1),
    dict(num_classes=4, share=True, bg=0, code="CENTER_SIZE", vit=False, keep_top_k=7, conf_thr=0.05,
         nms_thr=0.3, eta=1.0, top_k=20),
    dict(num_classes=3, share=False, bg=1, code="CORNER", vit=False, keep_top_k=-1, conf_thr=0.1,
         nms_thr=0.5, eta=1.0, top_k=-1),
    dict(num_classes=2, share=True, bg=0, code="CORNER_SIZE", vit=True, keep_top_k=50, conf_thr=None,
         nms_thr=0.7, eta=0.9, top_k=30),
    dict(num_classes=3, share=True, bg=0, code="CENTER_SIZE", vit=True, keep_top_k=-1, conf_thr=0.3,
         nms_thr=0.6, eta=0.8, top_k=-1),
]


@pytest.mark.parametrize("case", DET_CASES)
def test_detection_output(case: dict) -> None:
    num, npri = 2, 60
    nc = case["num_classes"]
    nloc = 1 if case["share"] else nc
    loc, conf, prior = _ssd_inputs(num, npri, nc, nloc)
    params = (f"detection_output_param {{ num_classes: {nc} share_location: {str(case['share']).lower()} "
              f"background_label_id: {case['bg']} code_type: {case['code']} "
              f"variance_encoded_in_target: {str(case['vit']).lower()} keep_top_k: {case['keep_top_k']} "
              f"nms_param {{ nms_threshold: {case['nms_thr']} eta: {case['eta']} "
              + (f"top_k: {case['top_k']} " if case["top_k"] > -1 else "") + "} "
              + (f"confidence_threshold: {case['conf_thr']} " if case["conf_thr"] is not None else "") + "}")
    layer = make("DetectionOutput", params, [loc.shape, conf.shape, prior.shape])
    out = run(layer, loc, conf, prior)
    conf_thr = case["conf_thr"] if case["conf_thr"] is not None else -3.4028234663852886e38
    ref = ref_detection_output(loc, conf, prior, nc, case["share"], case["bg"], case["code"], case["vit"],
                               case["keep_top_k"], conf_thr, case["nms_thr"], case["eta"], case["top_k"])
    assert out.shape == ref.shape and out.shape[2] > 0
    np.testing.assert_array_equal(out, ref)


def test_detection_output_nothing_found() -> None:
    loc, conf, prior = _ssd_inputs(3, 10, 2, 1)
    layer = make("DetectionOutput", "detection_output_param { num_classes: 2 confidence_threshold: 1.5 }",
                 [loc.shape, conf.shape, prior.shape])
    out = run(layer, loc, conf, prior)
    expect = np.full((1, 1, 3, 7), -1, np.float32)
    expect[0, 0, :, 0] = [0, 1, 2]
    np.testing.assert_array_equal(out, expect)
    assert layer.top_shapes([loc.shape, conf.shape, prior.shape]) == [(1, 1, 1, 7)]


def test_detection_output_errors() -> None:
    loc, conf, prior = _ssd_inputs(1, 10, 3, 1)
    shapes = [loc.shape, conf.shape, prior.shape]
    with pytest.raises(CaffeportError, match="num_classes"):
        make("DetectionOutput", "detection_output_param { }", shapes)
    with pytest.raises(CaffeportError, match="confidence predictions"):
        make("DetectionOutput", "detection_output_param { num_classes: 4 }", shapes)
    with pytest.raises(CaffeportError, match="eta"):
        make("DetectionOutput", "detection_output_param { num_classes: 3 nms_param { eta: 1.5 } }", shapes)
    with pytest.raises(CaffeportError, match="background_label_id -1"):
        make("DetectionOutput", "detection_output_param { num_classes: 3 background_label_id: -1 }", shapes)


# ---------------------------------------------------------------------------------------------
# ShuffleChannel, ConvolutionDepthwise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel(group: int) -> None:
    x = RNG.standard_normal((2, 6, 3, 2)).astype(np.float32)
    layer = make("ShuffleChannel", f"shuffle_channel_param {{ group: {group} }}", [x.shape])
    out = run(layer, x)
    rows, cols = group, 6 // group
    ref = np.empty_like(x)
    for i in range(rows):  # Resize_cpu: input block (i*cols + j) -> output block (j*rows + i)
        for j in range(cols):
            ref[:, j * rows + i] = x[:, i * cols + j]
    np.testing.assert_array_equal(out, ref)
    xt = torch.from_numpy(x).requires_grad_(True)
    g = torch.from_numpy(RNG.standard_normal(x.shape).astype(np.float32))
    layer(xt).backward(g)
    gref = np.empty_like(x)  # the fork's backward: the inverse shuffle of the top diff
    for i in range(cols):
        for j in range(rows):
            gref[:, j * cols + i] = g.numpy()[:, i * rows + j]
    np.testing.assert_array_equal(xt.grad.numpy(), gref)
    with pytest.raises(CaffeportError, match="multiple of group"):
        make("ShuffleChannel", "shuffle_channel_param { group: 4 }", [x.shape])


@pytest.mark.parametrize("geom", ["kernel_size: 3 stride: 2 pad: 1",
                                  "kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2",
                                  "kernel_size: 3 dilation: 2 pad: 2"])
@pytest.mark.parametrize("bias", [True, False])
def test_convolution_depthwise(geom: str, bias: bool) -> None:
    x = RNG.standard_normal((2, 4, 7, 8)).astype(np.float32)
    # num_output is ignored by the fork: output channels = input channels.
    layer = make("ConvolutionDepthwise", f"convolution_param {{ num_output: 99 {geom} bias_term: {str(bias).lower()} "
                 "weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'gaussian' std: 1 } }", [x.shape])
    w = layer.blobs[0].detach().numpy()
    assert w.shape[:2] == (4, 1) and len(layer.blobs) == (2 if bias else 1)
    kh, kw = w.shape[2:]
    sh, sw = layer.stride
    ph, pw = layer.pad
    dh, dw = layer.dilation
    oh = (7 + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (8 + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    ref = np.zeros((2, 4, oh, ow), np.float64)
    for n in range(2):
        for c in range(4):
            for h in range(oh):
                for wo in range(ow):
                    v = 0.0
                    for i in range(kh):
                        for j in range(kw):
                            hi, wi = -ph + h * sh + i * dh, -pw + wo * sw + j * dw
                            if 0 <= hi < 7 and 0 <= wi < 8:
                                v += w[c, 0, i, j] * x[n, c, hi, wi]
                    ref[n, c, h, wo] = v + (layer.blobs[1].detach().numpy()[c] if bias else 0.0)
    out = run(layer, x)
    assert out.shape == tuple(layer.top_shapes([x.shape])[0])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert layer.param.convolution_param.num_output == 99  # the net's message is left as written


# ---------------------------------------------------------------------------------------------
# BN (PSPNet)
# ---------------------------------------------------------------------------------------------
def _bn(params: str, shape, phase):
    layer = make("BN", f"bn_param {{ {params} }}", [shape], phase=phase)
    c = shape[1]
    vals = [RNG.uniform(0.5, 1.5, c), RNG.standard_normal(c), RNG.standard_normal(c), RNG.uniform(0.2, 2.0, c)]
    with torch.no_grad():
        for b, v in zip(layer.blobs, vals):
            b.copy_(torch.from_numpy(v.astype(np.float32)).reshape(1, c, 1, 1))
    return layer, [v.astype(np.float32) for v in vals]


def ref_bn_backward(x, dy, slope, mean, var, eps):
    """bn_layer.cpp Backward_cpu (non-frozen) with x_norm from the given statistics."""
    n, c = x.shape[:2]
    xs, g0 = x.reshape(n, c, -1).astype(np.float64), dy.reshape(n, c, -1).astype(np.float64)
    inv = 1.0 / np.sqrt(var + eps)
    xn = (xs - mean[None, :, None]) * inv[None, :, None]
    m = xs.shape[0] * xs.shape[2]
    g = g0 * slope[None, :, None]
    bd = xn * (xn * g).sum(axis=(0, 2))[None, :, None] + g.sum(axis=(0, 2))[None, :, None]
    bd = (g - bd / m) * inv[None, :, None]
    return bd.reshape(x.shape), (xn * g0).sum(axis=(0, 2)), g0.sum(axis=(0, 2))


@pytest.mark.parametrize("mode", ["test", "frozen_train", "train"])
def test_bn(mode: str) -> None:
    shape = (3, 4, 5, 2)
    eps, mom = 1e-4, 0.9
    frozen = mode == "frozen_train"
    phase = TEST if mode == "test" else TRAIN
    layer, (slope, bias, mean, var) = _bn(f"eps: {eps} momentum: {mom} frozen: {str(frozen).lower()}", shape, phase)
    x = RNG.standard_normal(shape).astype(np.float32) * 2 + 0.5
    xs = x.reshape(3, 4, -1).astype(np.float64)
    if mode == "train":
        bm = xs.mean(axis=(0, 2))
        bv = ((xs - bm[None, :, None]) ** 2).mean(axis=(0, 2))
        use_m, use_v = bm, bv
    else:
        use_m, use_v = mean.astype(np.float64), var.astype(np.float64)
    ref = (slope[None, :, None] * (xs - use_m[None, :, None]) / np.sqrt(use_v + eps)[None, :, None]
           + bias[None, :, None]).reshape(shape)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = layer(xt)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    if mode == "train":  # moving averages: (1 - momentum) * batch + momentum * old
        np.testing.assert_allclose(layer.blobs[2].detach().numpy().reshape(-1), (1 - mom) * bm + mom * mean, rtol=1e-5)
        np.testing.assert_allclose(layer.blobs[3].detach().numpy().reshape(-1), (1 - mom) * bv + mom * var, rtol=1e-5)
    else:
        np.testing.assert_array_equal(layer.blobs[2].detach().numpy().reshape(-1), mean)
    dy = RNG.standard_normal(shape).astype(np.float32)
    out.backward(torch.from_numpy(dy))
    if frozen:
        expect = (dy.reshape(3, 4, -1) * (slope / np.sqrt(var + eps))[None, :, None]).reshape(shape)
        np.testing.assert_allclose(xt.grad.numpy(), expect, rtol=1e-5, atol=1e-6)
    else:
        bd, ds, db = ref_bn_backward(x, dy, slope, use_m, use_v, eps)
        np.testing.assert_allclose(xt.grad.numpy(), bd, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.blobs[0].grad.numpy().reshape(-1), ds, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.blobs[1].grad.numpy().reshape(-1), db, rtol=1e-4, atol=1e-5)


def test_bn_setup_rewrites_param_specs() -> None:
    layer = make("BN", "param { lr_mult: 1 } param { lr_mult: 1 } bn_param { frozen: true "
                 "slope_filler { type: 'constant' value: 2 } }", [(1, 3, 2, 2)])
    assert [b.shape for b in layer.blobs] == [torch.Size([1, 3, 1, 1])] * 4
    assert float(layer.blobs[0].detach().flatten()[0]) == 2.0 and float(layer.blobs[3].flatten()[0]) == 1.0
    assert [s.lr_mult for s in layer.param.param] == [0, 0, 0, 0]
    layer = make("BN", "", [(1, 3, 2, 2)])
    assert [s.lr_mult for s in layer.param.param][2:] == [0, 0] and float(layer.blobs[3].flatten()[0]) == 0.0
    assert layer.eps == pytest.approx(1e-5) and layer.momentum == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------
# Interp (PSPNet / DeepLab)
# ---------------------------------------------------------------------------------------------
def _interp_coeffs(size1: int, size2: int, i2: int):
    r = F(F(size1 - 1) / F(size2 - 1)) if size2 > 1 else F(0)
    pos = F(r * F(i2))
    i1 = int(pos)
    step = 1 if i1 < size1 - 1 else 0
    lam1 = F(pos - F(i1))
    return i1, step, F(F(1) - lam1), lam1


def ref_interp(x: np.ndarray, pad_beg: int, h_eff: int, w_eff: int, h2: int, w2: int) -> np.ndarray:
    """caffe_cpu_interp2 (not packed) on the crop starting at -pad_beg, float32 arithmetic."""
    n, c = x.shape[:2]
    y0 = -pad_beg
    out = np.zeros((n, c, h2, w2), np.float32)
    for a in range(n):
        for ch in range(c):
            d = x[a, ch]
            for h in range(h2):
                if h_eff == h2 and w_eff == w2:
                    out[a, ch, h] = d[y0 + h, y0:y0 + w2]
                    continue
                h1, hp, hl0, hl1 = _interp_coeffs(h_eff, h2, h)
                for w in range(w2):
                    w1, wp, wl0, wl1 = _interp_coeffs(w_eff, w2, w)
                    r0, r1, c0, c1 = y0 + h1, y0 + h1 + hp, y0 + w1, y0 + w1 + wp
                    out[a, ch, h, w] = F(F(hl0 * F(F(wl0 * d[r0, c0]) + F(wl1 * d[r0, c1])))
                                         + F(hl1 * F(F(wl0 * d[r1, c0]) + F(wl1 * d[r1, c1]))))
    return out


def ref_interp_backward(dy: np.ndarray, xshape, pad_beg: int, h_eff: int, w_eff: int) -> np.ndarray:
    """caffe_cpu_interp2_backward (accumulating adjoint), float64."""
    n, c, h2, w2 = dy.shape
    gx = np.zeros(xshape, np.float64)
    y0 = -pad_beg
    for h in range(h2):
        for w in range(w2):
            if h_eff == h2 and w_eff == w2:
                gx[:, :, y0 + h, y0 + w] += dy[:, :, h, w]
                continue
            h1, hp, hl0, hl1 = _interp_coeffs(h_eff, h2, h)
            w1, wp, wl0, wl1 = _interp_coeffs(w_eff, w2, w)
            r0, r1, c0, c1 = y0 + h1, y0 + h1 + hp, y0 + w1, y0 + w1 + wp
            g = dy[:, :, h, w]
            gx[:, :, r0, c0] += hl0 * wl0 * g
            gx[:, :, r0, c1] += hl0 * wl1 * g
            gx[:, :, r1, c0] += hl1 * wl0 * g
            gx[:, :, r1, c1] += hl1 * wl1 * g
    return gx


INTERP_CASES = [
    ("zoom_factor: 8", (2, 3, 4, 5), (25, 33)),
    ("height: 7 width: 3", (1, 2, 5, 6), (7, 3)),
    ("shrink_factor: 2", (1, 2, 9, 8), (5, 4)),
    ("shrink_factor: 2 zoom_factor: 3", (1, 2, 9, 8), (13, 10)),
    ("zoom_factor: 2 pad_beg: -1 pad_end: -2", (1, 2, 8, 9), (9, 11)),
    ("height: 6 width: 7 pad_beg: -1 pad_end: -1", (1, 2, 8, 9), (6, 7)),  # crop copy (sizes equal)
    ("height: 1 width: 4", (1, 1, 5, 6), (1, 4)),
]


@pytest.mark.parametrize("params,shape,out_hw", INTERP_CASES)
def test_interp(params: str, shape, out_hw) -> None:
    layer = make("Interp", f"interp_param {{ {params} }}", [shape])
    assert layer.top_shapes([shape]) == [(shape[0], shape[1], *out_hw)]
    x = RNG.standard_normal(shape).astype(np.float32)
    pb, pe = layer.pad_beg, layer.pad_end
    h_eff, w_eff = shape[2] + pb + pe, shape[3] + pb + pe
    out = run(layer, x)
    np.testing.assert_allclose(out, ref_interp(x, pb, h_eff, w_eff, *out_hw), rtol=1e-6, atol=1e-6)
    xt = torch.from_numpy(x).requires_grad_(True)
    dy = RNG.standard_normal(out.shape).astype(np.float32)
    layer(xt).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(xt.grad.numpy(), ref_interp_backward(dy, x.shape, pb, h_eff, w_eff),
                               rtol=1e-5, atol=1e-5)


def test_interp_second_bottom_and_errors() -> None:
    layer = make("Interp", "", [(1, 2, 3, 4), (1, 5, 6, 9)])
    assert layer.top_shapes([(1, 2, 3, 4), (1, 5, 6, 9)]) == [(1, 2, 6, 9)]
    with pytest.raises(CaffeportError, match="non-positive"):
        make("Interp", "interp_param { zoom_factor: 2 pad_beg: 1 }", [(1, 1, 4, 4)])
    with pytest.raises(CaffeportError, match="zoom_factor, shrink_factor"):
        make("Interp", "interp_param { height: 3 }", [(1, 1, 4, 4)])
    with pytest.raises(CaffeportError, match="positive"):
        make("Interp", "interp_param { zoom_factor: 0 }", [(1, 1, 4, 4)])


# ---------------------------------------------------------------------------------------------
# Upsample (SegNet)
# ---------------------------------------------------------------------------------------------
def ref_upsample(x: np.ndarray, mask: np.ndarray, uh: int, uw: int) -> np.ndarray:
    """upsample_layer.cpp Forward_cpu: per (n, c) plane, top[int(mask[i])] = bottom[i] in order."""
    n, c, h, w = x.shape
    top = np.zeros((n, c, uh * uw), np.float32)
    for a in range(n):
        for ch in range(c):
            b, m = x[a, ch].reshape(-1), mask[a, ch].reshape(-1)
            for i in range(h * w):
                idx = int(m[i])
                assert idx < uh * uw
                top[a, ch, idx] = b[i]
    return top.reshape(n, c, uh, uw)


def ref_upsample_backward(dy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """upsample_layer.cpp Backward_cpu: bottom_diff[i] = top_diff[int(mask[i])]."""
    n, c, h, w = mask.shape
    bd = np.zeros(mask.shape, np.float32)
    for a in range(n):
        for ch in range(c):
            t, m = dy[a, ch].reshape(-1), mask[a, ch].reshape(-1)
            for i in range(h * w):
                bd[a, ch].reshape(-1)[i] = t[int(m[i])]
    return bd


def ref_max_pool(x: np.ndarray, k: int, s: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """BVLC pooling_layer.cpp MAX Forward_cpu with the mask top (sizes as its Reshape)."""
    n, c, h, w = x.shape
    ph_n = int(math.ceil((h + 2 * pad - k) / s)) + 1
    pw_n = int(math.ceil((w + 2 * pad - k) / s)) + 1
    if pad:
        ph_n -= (ph_n - 1) * s >= h + pad
        pw_n -= (pw_n - 1) * s >= w + pad
    top = np.full((n, c, ph_n, pw_n), -np.finfo(np.float32).max, np.float32)
    mask = np.full((n, c, ph_n, pw_n), -1.0, np.float32)
    for a in range(n):
        for ch in range(c):
            for ph in range(ph_n):
                for pw in range(pw_n):
                    hs, ws = ph * s - pad, pw * s - pad
                    he, we = min(hs + k, h), min(ws + k, w)
                    for hh in range(max(hs, 0), he):
                        for ww in range(max(ws, 0), we):
                            if x[a, ch, hh, ww] > top[a, ch, ph, pw]:
                                top[a, ch, ph, pw] = x[a, ch, hh, ww]
                                mask[a, ch, ph, pw] = hh * w + ww
    return top, mask


UPSAMPLE_SHAPES = [
    ("", (2, 3, 4, 5), (8, 10)),
    ("upsample_param { scale: 3 }", (1, 2, 3, 4), (9, 12)),
    ("upsample_param { scale_h: 2 scale_w: 3 }", (1, 2, 3, 4), (6, 12)),
    ("upsample_param { pad_out_h: true }", (1, 2, 3, 4), (5, 8)),
    ("upsample_param { scale_h: 2 scale_w: 2 pad_out_h: true pad_out_w: true }", (1, 1, 3, 4), (5, 7)),
    ("upsample_param { upsample_h: 7 upsample_w: 9 }", (1, 2, 3, 4), (7, 9)),
    # upsample_h/w win over the scale; one of them alone is ignored (the fork's setup)
    ("upsample_param { scale: 3 scale_h: 5 upsample_h: 7 upsample_w: 9 }", (1, 2, 3, 4), (7, 9)),
    ("upsample_param { upsample_h: 7 }", (1, 2, 3, 4), (6, 8)),
]


@pytest.mark.parametrize("params,shape,out_hw", UPSAMPLE_SHAPES)
def test_upsample_matches_fork_loops(params: str, shape, out_hw) -> None:
    layer = make("Upsample", params, [shape, shape])
    assert layer.top_shapes([shape, shape]) == [(*shape[:2], *out_hw)]
    n, c, h, w = shape
    size = out_hw[0] * out_hw[1]
    # Random positions with repeats (the fork's later write wins; its backward reads every one).
    mask = RNG.integers(0, size, (n, c, h, w)).astype(np.float32)
    mask.reshape(n, c, -1)[:, :, -1] = mask.reshape(n, c, -1)[:, :, 0]
    mask.reshape(-1)[1] = size - 1 + 0.75  # truncated as static_cast<int>
    x = RNG.standard_normal(shape).astype(np.float32)
    out = run(layer, x, mask)
    np.testing.assert_array_equal(out, ref_upsample(x, mask, *out_hw))
    xt = torch.from_numpy(x).requires_grad_(True)
    mt = torch.from_numpy(mask)
    dy = RNG.standard_normal(out.shape).astype(np.float32)
    top = layer(xt, mt)
    np.testing.assert_array_equal(top.detach().numpy(), out)
    top.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(xt.grad.numpy(), ref_upsample_backward(dy, mask))


POOL_UPSAMPLE = [
    ((2, 3, 8, 10), "kernel_size: 2 stride: 2", "", 0),
    ((1, 2, 7, 9), "kernel_size: 2 stride: 2", "pad_out_h: true pad_out_w: true", 0),  # SegNet's odd sizes
    ((1, 2, 9, 11), "kernel_size: 3 stride: 2", "upsample_h: 9 upsample_w: 11", 0),  # overlapping windows
    ((1, 2, 6, 7), "kernel_size: 3 stride: 2 pad: 1", "upsample_h: 6 upsample_w: 7", 1),
]


@pytest.mark.parametrize("shape,pool,up,pad", POOL_UPSAMPLE)
def test_upsample_after_max_pooling_mask(tmp_path: Path, shape, pool: str, up: str, pad: int) -> None:
    """Pooling (MAX, mask top) -> Upsample in a Net, forward and backward, against the numpy loops of
    BVLC's pooling and the fork's upsample."""
    from caffeport.net import Net

    proto = tmp_path / "unpool.prototxt"
    proto.write_text(
        f'force_backward: true input: "data" input_shape {{ dim: {" dim: ".join(map(str, shape))} }}\n'
        f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask" '
        f'pooling_param {{ pool: MAX {pool} }} }}\n'
        f'layer {{ name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "up" '
        f'upsample_param {{ {up} }} }}\n')
    net = Net(proto)
    x = RNG.standard_normal(shape).astype(np.float32)
    k, s = (3, 2) if "kernel_size: 3" in pool else (2, 2)
    pooled, mask = ref_max_pool(x, k, s, pad)
    want = ref_upsample(pooled, mask, *shape[2:])
    out = net.forward(data=x)["up"]
    np.testing.assert_array_equal(net.blobs["mask"].data, mask)
    np.testing.assert_array_equal(out, want)
    dy = RNG.standard_normal(want.shape).astype(np.float32)
    gx = net.backward(up=dy)["data"]
    # Upsample gathers dy at the mask; BVLC's MAX backward adds each pooled diff at its mask position.
    gp = ref_upsample_backward(dy, mask)
    ref = np.zeros(shape, np.float64)
    for a in range(shape[0]):
        for ch in range(shape[1]):
            np.add.at(ref[a, ch].reshape(-1), mask[a, ch].reshape(-1).astype(int), gp[a, ch].reshape(-1))
    np.testing.assert_allclose(gx, ref, rtol=1e-6, atol=1e-6)


def test_upsample_gradient_fd() -> None:
    shape, out_hw = (2, 2, 3, 4), (6, 8)
    layer = make("Upsample", "", [shape, shape])
    perm = np.stack([RNG.permutation(48)[:12] for _ in range(4)]).reshape(shape)  # distinct positions
    x = torch.from_numpy(RNG.standard_normal(shape))
    fd_check(layer, [x, torch.from_numpy(perm.astype(np.float64))], check=(0,))
    assert layer.top_shapes([shape, shape]) == [(*shape[:2], *out_hw)]


@pytest.mark.parametrize("params,match", [
    ("upsample_param { scale: 1 }", "scale must be > 1"),
    ("upsample_param { scale_h: 2 scale_w: 1 }", "scale_h and scale_w must be > 1"),
    ("upsample_param { scale: 2 scale_h: 2 scale_w: 2 }", "upsample_h & upsample_w are required"),
    ("upsample_param { scale_h: 2 }", "upsample_h & upsample_w are required"),
    ("upsample_param { upsample_h: 1 upsample_w: 4 }", "must be > 1"),
    ("upsample_param { scale: 3 pad_out_h: true }", "pad_out_h requires scale_h == 2"),
    ("upsample_param { scale_h: 2 scale_w: 3 pad_out_w: true }", "pad_out_w requires scale_w == 2"),
])
def test_upsample_param_errors(params: str, match: str) -> None:
    with pytest.raises(CaffeportError, match=match):
        make("Upsample", params, [(1, 1, 2, 2), (1, 1, 2, 2)])


def test_upsample_bottom_and_mask_errors() -> None:
    with pytest.raises(CaffeportError, match="must equal the input shape"):
        make("Upsample", "", [(1, 2, 3, 3), (1, 2, 3, 4)])
    with pytest.raises(CaffeportError, match="4 axes"):
        make("Upsample", "", [(2, 3, 4), (2, 3, 4)])
    with pytest.raises(CaffeportError, match="has 1 bottoms"):
        make("Upsample", "", [(1, 2, 3, 3)])
    layer = make("Upsample", "", [(1, 1, 2, 2), (1, 1, 2, 2)])
    x = np.ones((1, 1, 2, 2), np.float32)
    with pytest.raises(CaffeportError, match="index 16 out of range"):
        run(layer, x, np.array([0, 1, 2, 16], np.float32).reshape(1, 1, 2, 2))
    with pytest.raises(CaffeportError, match="index -1 out of range"):  # an empty pooling window's mask
        run(layer, x, np.array([0, -1, 2, 3], np.float32).reshape(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------
# Corpus nets
# ---------------------------------------------------------------------------------------------
def _corpus_nets() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    out = []
    for p in sorted(CORPUS.rglob("*.prototxt")):
        text = p.read_text(errors="replace")
        if any(f'type: "{t}"' in text for t in FORK_TYPES) and "solver" not in p.name:
            out.append(p)
    return out


def _is_deploy(p: Path) -> bool:
    """Deploy nets: no data layers reading sources (train/test nets need their LMDBs)."""
    text = p.read_text(errors="replace")
    return not any(f'type: "{t}"' in text for t in ("Data", "AnnotatedData", "ImageData", "HDF5Data"))


@pytest.mark.parametrize("path", [p for p in _corpus_nets() if _is_deploy(p)],
                         ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_deploy_nets_build(path: Path) -> None:
    from caffeport.net import Net

    net = Net(path, phase=TEST)
    types = {layer.param.type for layer in net.layers}
    assert types & set(FORK_TYPES)


def test_corpus_has_fork_nets() -> None:
    assert CORPUS.is_dir(), f"shared corpus not found at {CORPUS}"
    deploy = [p for p in _corpus_nets() if _is_deploy(p)]
    assert len(deploy) >= 10


def _cv2_caffe():
    import cv2

    assert hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromCaffe"), (
        f"OpenCV {cv2.__version__} has no Caffe importer (OpenCV 5 dropped it): install requirements-dev.txt"
    )
    return cv2


def _det_rows(a: np.ndarray) -> np.ndarray:
    rows = a.reshape(-1, 7)
    rows = rows[rows[:, 1] >= 0]  # OpenCV and Caffe mark "nothing" differently
    return rows[np.lexsort(rows.T[::-1])]


def _compare_with_opencv(proto: Path, model: Path, tmp_path: Path, seed: int = 0) -> dict[str, float]:
    """Run both on one random input; return the max relative error per compared layer."""
    cv2 = _cv2_caffe()
    from caffeport.net import Net

    net = Net(proto, model)
    inp = net.inputs[0]
    x = (np.random.default_rng(seed).random(net.blobs[inp].data.shape, dtype=np.float32) * 255 - 127.5)
    cvn = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    cvn.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvn.enableFusion(False)
    cvn.setInput(x)
    names = [n for n in net.layer_names
             if net.layer_by_name(n).param.type in ("Normalize", "Permute", "PriorBox", "DetectionOutput")]
    outs = cvn.forward(names)
    net.forward(**{inp: x})
    errs: dict[str, float] = {}
    for name, o in zip(names, outs):
        mine = net.blobs[net.top_names[name][0]].data
        if net.layer_by_name(name).param.type == "DetectionOutput":
            a, b = _det_rows(mine), _det_rows(o)
            assert a.shape == b.shape, (name, a.shape, b.shape)
            assert len(a) > 0
            np.testing.assert_array_equal(a[:, :2], b[:, :2])
            np.testing.assert_allclose(a[:, 2:], b[:, 2:], rtol=1e-4, atol=1e-5)
            errs[name] = float(np.abs(a[:, 2:] - b[:, 2:]).max())
            continue
        assert mine.size == o.size, (name, mine.shape, o.shape)
        o = o.reshape(mine.shape)
        err = float(np.abs(mine - o).max() / max(float(np.abs(o).max()), 1e-12))
        assert err < 1e-4, (name, err)
        errs[name] = err
    assert errs
    return errs


YUNET = CORPUS / "4_real_caffemodels" / "libfacedetection_yufacedetectnet" / "models" / "caffe"
ULTRA = CORPUS / "4_real_caffemodels" / "ultraface_linzaer" / "caffe" / "model"
REAL_SSD = [
    (YUNET / "yufacedetectnet-open-v1.prototxt", YUNET / "yufacedetectnet-open-v1.caffemodel"),
    (YUNET / "yufacedetectnet-open-v2.prototxt", YUNET / "yufacedetectnet-open-v2.caffemodel"),
    (ULTRA / "RFB-320" / "RFB-320.prototxt", ULTRA / "RFB-320" / "RFB-320.caffemodel"),
    (ULTRA / "Slim-320" / "slim-320.prototxt", ULTRA / "Slim-320" / "slim-320.caffemodel"),
]


@pytest.mark.parametrize("proto,model", REAL_SSD, ids=lambda p: p.stem)
def test_real_ssd_nets_match_opencv(proto: Path, model: Path, tmp_path: Path) -> None:
    assert model.exists(), f"{model} is missing from the corpus"
    _compare_with_opencv(proto, model, tmp_path)


ZOO_SSD = [
    CORPUS / "3_model_zoo" / "mobilenet_ssd_chuanqi305" / "MobileNetSSD_deploy.prototxt",
    CORPUS / "3_model_zoo" / "ssd_vgg16_voc0712" / "models" / "VGGNet" / "VOC0712" / "SSD_300x300" / "deploy.prototxt",
]


@pytest.mark.parametrize("proto", ZOO_SSD, ids=lambda p: p.parent.name)
def test_zoo_ssd_nets_with_random_weights_match_opencv(proto: Path, tmp_path: Path) -> None:
    """Model-zoo SSD deploy nets ship no weights: caffeport's filler weights are saved as a
    caffemodel that both sides load."""
    _cv2_caffe()
    assert proto.exists(), f"{proto} is missing from the corpus"
    from caffeport.net import Net

    torch.manual_seed(0)
    net = Net(proto)
    # Make the confidences informative enough to give detections past the thresholds.
    model = tmp_path / "w.caffemodel"
    net.save(model)
    _compare_with_opencv(proto, model, tmp_path)


SHUFFLENETS = [CORPUS / "3_model_zoo" / "shufflenet_farmingyard" / "shufflenet_1x_g3_deploy.prototxt",
               CORPUS / "3_model_zoo" / "shufflenet_farmingyard" / "shufflenet_v2_1x_deploy.prototxt"]


@pytest.mark.parametrize("proto", SHUFFLENETS, ids=lambda p: p.stem)
def test_shufflenets_with_random_weights_match_opencv(proto: Path, tmp_path: Path) -> None:
    """ShuffleChannel and ConvolutionDepthwise outputs (not overwritten by in-place layers) and the
    final scores against OpenCV, with filler weights and sane BatchNorm statistics."""
    cv2 = _cv2_caffe()
    assert proto.exists(), f"{proto} is missing from the corpus"
    from caffeport.net import Net

    torch.manual_seed(0)
    net = Net(proto)
    with torch.no_grad():
        for layer in net.layers:
            if layer.param.type == "BatchNorm":
                layer.blobs[0].normal_()
                layer.blobs[1].uniform_(0.5, 2.0)
                layer.blobs[2].fill_(1.0)
    model = tmp_path / "w.caffemodel"
    net.save(model)
    cvn = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    cvn.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvn.enableFusion(False)
    x = np.random.default_rng(1).standard_normal(net.blobs[net.inputs[0]].data.shape).astype(np.float32)
    in_place = {t for layer in net.layers for t in layer.param.top if t in layer.param.bottom}
    names = [n for n in net.layer_names if net.layer_by_name(n).param.type in ("ShuffleChannel", "ConvolutionDepthwise")
             and net.top_names[n][0] not in in_place]
    names.append(net.layer_names[-1])
    assert len(names) > 10
    cvn.setInput(x)
    outs = cvn.forward(names)
    net.forward(**{net.inputs[0]: x})
    for name, o in zip(names, outs):
        mine = net.blobs[net.top_names[name][0]].data
        err = float(np.abs(mine - o.reshape(mine.shape)).max() / max(float(np.abs(o).max()), 1e-12))
        assert err < 1e-4, (name, err)


def test_interp_matches_opencv(tmp_path: Path) -> None:
    cv2 = _cv2_caffe()
    from caffeport.net import Net

    proto = tmp_path / "interp.prototxt"
    proto.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 7 dim: 9 }\n'
                     'layer { name: "a" type: "Interp" bottom: "data" top: "a" interp_param { zoom_factor: 8 } }\n'
                     'layer { name: "b" type: "Interp" bottom: "data" top: "b" '
                     'interp_param { height: 60 width: 23 } }\n')
    net = Net(proto)
    model = tmp_path / "interp.caffemodel"
    net.save(model)
    cvn = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    cvn.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    x = RNG.standard_normal((1, 3, 7, 9)).astype(np.float32)
    cvn.setInput(x)
    outs = cvn.forward(["a", "b"])
    net.forward(data=x)
    for name, o in zip(["a", "b"], outs):
        np.testing.assert_allclose(net.blobs[name].data, o, rtol=1e-5, atol=2e-6)
