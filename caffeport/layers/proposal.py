"""py-faster-rcnn's RPN proposal layer (``rpn.proposal_layer.ProposalLayer``), built in.

Faster R-CNN deploy nets name it as a ``type: "Python"`` layer (``python_param { module:
'rpn.proposal_layer' layer: 'ProposalLayer' param_str: "'feat_stride': 16" }``). caffeport builds this
class instead of importing user code, so those nets run without ``allow_python_layers`` (OpenCV dnn
ships the same idea as its ``Proposal`` layer). Semantics follow py-faster-rcnn (written from its
description, no code copied):

- 9 anchors from a 16x16 base box, ratios 0.5/1/2 and scales 8/16/32 (``generate_anchors``: widths and
  heights rounded half to even, as numpy's ``round``), shifted by ``feat_stride`` over the H x W map,
  ordered (h, w, anchor);
- foreground scores are channels ``A..2A-1`` of bottom 0; deltas (dx, dy, dw, dh) per anchor from
  bottom 1 applied as ``bbox_transform_inv`` (centre + 0.5 w, size ``exp(dw) * w``, with Caffe-era
  "+1" widths), boxes clipped to ``im_info`` (height, width) minus 1;
- boxes with a side below ``RPN_MIN_SIZE * im_info[2]`` dropped, sorted by score, ``pre_nms_topN`` kept,
  greedy NMS (suppress IoU > threshold, "+1" areas), ``post_nms_topN`` kept;
- py-faster-rcnn's config defaults: TRAIN 12000 / 2000, TEST 6000 / 300, NMS 0.7, min size 16.

Top 0 is ``(R, 5)`` rois ``(0, x1, y1, x2, y2)``; the optional top 1 the ``(R, 1)`` scores. Only batch 1
is supported, as in py-faster-rcnn. No gradient (the original's backward is empty). Differences: float32
throughout as the original; ties in scores are broken by a stable sort (numpy's quicksort order is
unspecified there).
"""

from __future__ import annotations

import ast
import re

import numpy as np
import torch

from caffeport.layers.base import TRAIN, Layer, Shape
from caffeport.layers.python import register_python_equivalent

# py-faster-rcnn's lib/fast_rcnn/config.py defaults: (pre_nms_topN, post_nms_topN, nms_thresh, min_size)
_CFG = {TRAIN: (12000, 2000, 0.7, 16), "TEST": (6000, 300, 0.7, 16)}


def generate_anchors(base_size: int = 16, ratios=(0.5, 1.0, 2.0), scales=(8, 16, 32)) -> np.ndarray:
    """Reference anchors (x1, y1, x2, y2), ratio-major then scale, as py-faster-rcnn's generate_anchors."""
    w = h = float(base_size)
    cx = cy = 0.5 * (base_size - 1)
    out = []
    for r in ratios:
        ws = np.round(np.sqrt(w * h / r))
        hs = np.round(ws * r)
        for s in scales:
            sw, sh = ws * s, hs * s
            out.append([cx - 0.5 * (sw - 1), cy - 0.5 * (sh - 1), cx + 0.5 * (sw - 1), cy + 0.5 * (sh - 1)])
    return np.array(out, dtype=np.float64)


def parse_param_str(text: str) -> dict[str, object]:
    """The YAML dict subset py-faster-rcnn's param_str uses (``'feat_stride': 16``, lists/tuples)."""
    text = text.replace("!!python/tuple", "")
    out: dict[str, object] = {}
    for key, value in re.findall(r"['\"]?(\w+)['\"]?\s*:\s*(\[[^\]]*\]|\([^)]*\)|[^,\n}]+)", text):
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """Greedy NMS as py-faster-rcnn (areas with +1, suppress IoU > thresh): kept indices, best first."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = torch.sort(scores, descending=True, stable=True).indices
    alive = torch.ones(order.numel(), dtype=torch.bool)
    bx1, by1, bx2, by2, ba = x1[order], y1[order], x2[order], y2[order], areas[order]
    keep = []
    for i in range(order.numel()):
        if not alive[i]:
            continue
        keep.append(i)
        rest = slice(i + 1, None)
        w = (torch.minimum(bx2[i], bx2[rest]) - torch.maximum(bx1[i], bx1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(by2[i], by2[rest]) - torch.maximum(by1[i], by1[rest]) + 1).clamp(min=0)
        inter = w * h
        ovr = inter / (ba[i] + ba[rest] - inter)
        alive[i + 1:] &= ovr <= thresh
    return order[torch.tensor(keep, dtype=torch.long)]


@register_python_equivalent("rpn.proposal_layer", "ProposalLayer")
class ProposalLayer(Layer):
    """py-faster-rcnn's RPN proposals: anchors + predicted deltas -> clipped, filtered, NMS'd rois."""

    type_name = "Python"
    has_backward = False
    min_bottoms = 3
    max_bottoms = 3
    min_tops = 1
    max_tops = 2
    no_grad_bottoms = (0, 1, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        params = parse_param_str(self.param.python_param.param_str)
        stride = params.get("feat_stride")
        if not isinstance(stride, (int, float)) or isinstance(stride, bool) or stride <= 0:
            raise self.error(f"python_param.param_str {self.param.python_param.param_str!r}: needs a positive "
                             "'feat_stride' (e.g. \"'feat_stride': 16\")")
        self.feat_stride = float(stride)
        scales = params.get("scales", (8, 16, 32))
        ratios = params.get("ratios", (0.5, 1.0, 2.0))
        try:
            anchors = generate_anchors(16, tuple(float(r) for r in ratios), tuple(float(s) for s in scales))
        except (TypeError, ValueError) as e:
            raise self.error(f"python_param.param_str: bad 'scales'/'ratios': {e}") from None
        self.register_buffer("anchors", torch.from_numpy(anchors.astype(np.float32)), persistent=False)
        self.num_anchors = anchors.shape[0]
        cfg = _CFG[TRAIN] if self.phase == TRAIN else _CFG["TEST"]
        self.pre_nms_top_n, self.post_nms_top_n, self.nms_thresh, self.min_size = cfg
        s0, s1, s2 = (tuple(s) for s in bottom_shapes)
        a = self.num_anchors
        if len(s0) != 4 or s0[1] != 2 * a:
            raise self.error(f"bottom 0 (scores) has shape {s0}, expected (1, {2 * a}, H, W)")
        if len(s1) != 4 or s1[1] != 4 * a or s1[2:] != s0[2:]:
            raise self.error(f"bottom 1 (bbox deltas) has shape {s1}, expected (1, {4 * a}, {s0[2]}, {s0[3]})")
        if s0[0] != 1 or s1[0] != 1:
            raise self.error(f"only single-image batches are supported (bottom shapes {s0}, {s1}), "
                             "as in py-faster-rcnn")
        if len(s2) < 2 or int(np.prod(s2[1:])) < 3:
            raise self.error(f"bottom 2 (im_info) has shape {s2}, expected (1, 3): height, width, scale")

    def forward(self, *bottoms: torch.Tensor):  # type: ignore[override]
        cls_prob, deltas, im_info = bottoms
        dev = cls_prob.device
        with torch.no_grad():
            a = self.num_anchors
            scores = cls_prob[:, a:].detach().to("cpu", torch.float32)
            deltas = deltas.detach().to("cpu", torch.float32)
            info = im_info.detach().to("cpu", torch.float32).reshape(-1)[:3]
            height, width = scores.shape[-2:]
            sx = torch.arange(width, dtype=torch.float32) * self.feat_stride
            sy = torch.arange(height, dtype=torch.float32) * self.feat_stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], 1)
            anchors = (self.anchors.cpu()[None] + shifts[:, None]).reshape(-1, 4)
            d = deltas.permute(0, 2, 3, 1).reshape(-1, 4)
            s = scores.permute(0, 2, 3, 1).reshape(-1)
            # bbox_transform_inv
            w = anchors[:, 2] - anchors[:, 0] + 1.0
            h = anchors[:, 3] - anchors[:, 1] + 1.0
            cx = anchors[:, 0] + 0.5 * w
            cy = anchors[:, 1] + 0.5 * h
            pcx = d[:, 0] * w + cx
            pcy = d[:, 1] * h + cy
            pw = torch.exp(d[:, 2]) * w
            ph = torch.exp(d[:, 3]) * h
            boxes = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], 1)
            # clip_boxes to (height, width) of the image
            zero = torch.zeros((), dtype=torch.float32)
            xmax, ymax = info[1] - 1, info[0] - 1
            boxes[:, 0] = torch.maximum(torch.minimum(boxes[:, 0], xmax), zero)
            boxes[:, 1] = torch.maximum(torch.minimum(boxes[:, 1], ymax), zero)
            boxes[:, 2] = torch.maximum(torch.minimum(boxes[:, 2], xmax), zero)
            boxes[:, 3] = torch.maximum(torch.minimum(boxes[:, 3], ymax), zero)
            # drop small boxes (min_size at the input image's scale)
            min_size = self.min_size * info[2]
            bw = boxes[:, 2] - boxes[:, 0] + 1
            bh = boxes[:, 3] - boxes[:, 1] + 1
            keep = torch.nonzero((bw >= min_size) & (bh >= min_size)).reshape(-1)
            boxes, s = boxes[keep], s[keep]
            order = torch.sort(s, descending=True, stable=True).indices
            if self.pre_nms_top_n > 0:
                order = order[: self.pre_nms_top_n]
            boxes, s = boxes[order], s[order]
            keep = nms_keep(boxes, s, self.nms_thresh)
            if self.post_nms_top_n > 0:
                keep = keep[: self.post_nms_top_n]
            boxes, s = boxes[keep], s[keep]
            rois = torch.cat([torch.zeros(boxes.shape[0], 1), boxes], 1).to(dev)
            s = s.reshape(-1, 1).to(dev)
        if len(self.param.top) > 1:
            return rois, s
        return rois
