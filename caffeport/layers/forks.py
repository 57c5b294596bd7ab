"""Widely used layers of Caffe forks, computed as the fork that defines them computes them.

- SSD (weiliu89/caffe): ``Normalize``, ``Permute``, ``PriorBox``, ``DetectionOutput``.
- ShuffleNet (farmingyard): ``ShuffleChannel`` and ``ConvolutionDepthwise`` (caffe-mobilenet's
  depthwise convolution: one filter per input channel, ``num_output`` ignored).
- PSPNet (hszhao/PSPNet's caffe): ``BN`` (learned slope/bias + moving mean/variance, ``bn_param``)
  and ``Interp`` (DeepLab's align-corners bilinear resize, ``interp_param``).
- SegNet (alexgkendall/caffe-segnet): ``Upsample`` (max-unpooling through a Pooling mask top,
  ``upsample_param``).

Numbers follow the forks' CPU code (``Forward_cpu``): the float32 rounding order of their loops is
kept where it decides results (prior boxes, box decoding, IoU in NMS, interpolation weights).
PriorBox and DetectionOutput have no gradient in the forks (PriorBox's backward does nothing,
DetectionOutput's is not implemented); the others use autograd, which equals the forks' backward
except where a class docstring says otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from caffeport.layers.base import TEST, TRAIN, Layer, Shape, register, run_function
from caffeport.layers.vision import Convolution
from caffeport.proto import caffe_pb2

FLT_MAX = 3.4028234663852886e38
_F32 = np.float32
_CodeType = caffe_pb2.PriorBoxParameter


def _legacy4(shape: Shape) -> tuple[int, int, int, int]:
    """Caffe's legacy (num, channels, height, width) view: missing trailing axes count as 1."""
    s = tuple(shape) + (1,) * (4 - len(shape))
    return int(s[0]), int(s[1]), int(s[2]), int(s[3])


# ---------------------------------------------------------------------------------------------
# SSD: Normalize
# ---------------------------------------------------------------------------------------------
class _NormalizeFn(torch.autograd.Function):
    """y = x / norm * scale on (N, C, S) with the fork's backward (see ``Normalize``)."""

    @staticmethod
    def forward(ctx, x, scale, across_spatial, eps):
        dims = (1, 2) if across_spatial else (1,)
        norm = torch.sqrt((x * x).sum(dim=dims, keepdim=True) + eps)
        s = scale.reshape(1, 1, 1) if scale.dim() == 0 else scale.reshape(1, -1, 1)
        ctx.save_for_backward(x, norm, scale)
        ctx.dims = dims
        return x / norm * s

    @staticmethod
    def backward(ctx, dy):
        x, norm, scale = ctx.saved_tensors
        s = scale.reshape(1, 1, 1) if scale.dim() == 0 else scale.reshape(1, -1, 1)
        dx = dscale = None
        if ctx.needs_input_grad[0]:
            a = (x * dy).sum(dim=ctx.dims, keepdim=True)
            dx = (dy - x * a / (norm * norm)) / norm * s
        if ctx.needs_input_grad[1]:
            t = x / norm * dy
            dscale = t.sum() if scale.dim() == 0 else t.sum(dim=(0, 2))
            dscale = dscale.reshape(scale.shape)
        return dx, dscale, None, None


@register("Normalize")
class Normalize(Layer):
    """SSD's L2 normalisation with a learned scale (``norm_param``).

    For each item: ``norm = sqrt(sum(x^2) + eps)`` over all of C*H*W (``across_spatial``, default)
    or over the channels at each spatial position; ``y = x / norm * scale`` where the scale blob is
    a single value (``channel_shared``, default; a 0-axis blob) or one per channel (shape (C,)).
    The default scale filler is constant 1.

    Backward is the fork's, which is not the true gradient when the scale is per channel: the fork
    back-propagates ``dy`` through the normalisation as if unscaled and multiplies the result by
    the scale, ``dx = s * (dy - x * sum(x * dy) / norm^2) / norm`` (sums over the normalised set),
    where the true gradient would use ``s * dy`` inside the sum. The scale gradient is
    ``sum(x / norm * dy)``; the fork computes it as ``sum(top * dy) / s`` (NaN at s = 0).
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(f"the bottom must have at least 2 axes, got {shape}")
        p = self.param.norm_param
        self.across_spatial = bool(p.across_spatial)
        self.channel_shared = bool(p.channel_shared)
        self.eps = float(p.eps)
        self.channels = _legacy4(shape)[1]
        if p.HasField("scale_filler"):
            filler = p.scale_filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        self.add_blob(() if self.channel_shared else (self.channels,), filler)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = x.reshape(x.shape[0], self.channels, -1)
        return _NormalizeFn.apply(xr, self.blobs[0], self.across_spatial, self.eps).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# SSD: Permute
# ---------------------------------------------------------------------------------------------
@register("Permute")
class Permute(Layer):
    """SSD's axis permutation: ``permute_param.order`` lists the new axis order; axes it does not
    name follow in their original order. Orders must be < the axis count and unique (the fork's
    CHECKs). The identity order shares the bottom as the fork does."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        nd = len(bottom_shapes[0])
        order: list[int] = []
        for o in self.param.permute_param.order:
            o = int(o)
            if o >= nd:
                raise self.error(f"permute_param.order {o} should be less than the input dimension {nd}")
            if o in order:
                raise self.error(f"permute_param.order has duplicate axis {o}")
            order.append(o)
        order += [i for i in range(nd) if i not in order]
        self.order = tuple(order)
        self.need_permute = self.order != tuple(range(nd))

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        s = bottom_shapes[0]
        return [tuple(s[o] for o in self.order)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.need_permute:
            return x
        return x.permute(self.order).contiguous()


# ---------------------------------------------------------------------------------------------
# SSD: PriorBox
# ---------------------------------------------------------------------------------------------
@register("PriorBox")
class PriorBox(Layer):
    """SSD's default boxes for a feature map (bottom 0) and an image (bottom 1).

    Top (1, 2, H*W*num_priors*4): channel 0 holds [xmin, ymin, xmax, ymax] normalised by the image
    size, in the order h, w, min_size, then (min_size box, sqrt(min*max) box, other aspect ratios
    ar with width min_size*sqrt(ar) and height min_size/sqrt(ar)); channel 1 holds the variances
    (one value, four values, or 0.1 by default). (One intermediate weiliu89 revision scaled the
    aspect-ratio boxes by sqrt(min*max) when max_size is given; the released SSD code and models,
    and OpenCV, use min_size, as here.)

    Fork details kept: ``min_size``/``max_size`` are truncated to int before use (``int min_size_``),
    aspect ratios are de-duplicated within 1e-6 (1 is always first) and flipped as ``1/ar`` stored
    as float; centres ``(w + offset) * step`` are float, corners are computed in double and
    stored as float; ``img_size``/``img_h``/``img_w`` and ``step``/``step_h``/``step_w`` override
    the sizes taken from the bottoms; ``clip`` clamps the corners to [0, 1]. Only the shapes of the
    bottoms are read. No gradient (the fork's backward does nothing).
    """

    has_backward = False
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.prior_box_param
        if not p.min_size:
            raise self.error("prior_box_param: must provide min_size")
        self.min_sizes = [float(m) for m in p.min_size]
        if any(m <= 0 for m in self.min_sizes):
            raise self.error("prior_box_param: min_size must be positive")
        self.flip = bool(p.flip)
        ars: list[float] = [1.0]
        for a in p.aspect_ratio:
            a = float(_F32(a))
            if any(abs(a - b) < 1e-6 for b in ars):
                continue
            ars.append(a)
            if self.flip:
                ars.append(float(_F32(1.0 / a)))
        self.aspect_ratios = ars
        self.max_sizes = [float(m) for m in p.max_size]
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error(f"prior_box_param: {len(self.max_sizes)} max_size values for "
                                 f"{len(self.min_sizes)} min_size values (must be equal)")
            for lo, hi in zip(self.min_sizes, self.max_sizes):
                if not hi > lo:
                    raise self.error(f"prior_box_param: max_size {hi} must be greater than min_size {lo}")
        self.num_priors = len(ars) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = bool(p.clip)
        var = [float(v) for v in p.variance]
        if len(var) > 1 and len(var) != 4:
            raise self.error(f"prior_box_param: give one variance or exactly 4 ({len(var)} given)")
        if any(v <= 0 for v in var):
            raise self.error("prior_box_param: variance must be positive")
        self.variance = var or [0.1]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.error("prior_box_param: either img_size or img_h/img_w should be specified; not both")
            self.img_h, self.img_w = int(p.img_h), int(p.img_w)
            if self.img_h <= 0 or self.img_w <= 0:
                raise self.error("prior_box_param: img_h and img_w should be larger than 0")
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise self.error("prior_box_param: img_size should be larger than 0")
            self.img_h = self.img_w = int(p.img_size)
        else:
            self.img_h = self.img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.error("prior_box_param: either step or step_h/step_w should be specified; not both")
            self.step_h, self.step_w = float(p.step_h), float(p.step_w)
            if not (self.step_h > 0 and self.step_w > 0):
                raise self.error("prior_box_param: step_h and step_w should be larger than 0")
        elif p.HasField("step"):
            if not p.step > 0:
                raise self.error("prior_box_param: step should be larger than 0")
            self.step_h = self.step_w = float(p.step)
        else:
            self.step_h = self.step_w = 0.0
        self.offset = float(p.offset)
        for s in bottom_shapes:
            if len(s) < 2:
                raise self.error(f"bottoms must have (num, channels, height, width) axes, got {s}")
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        _, _, h, w = _legacy4(bottom_shapes[0])
        return [(1, 2, h * w * self.num_priors * 4)]

    def priors(self, layer_h: int, layer_w: int, img_h: int, img_w: int) -> np.ndarray:
        """The (2, H*W*num_priors*4) float32 prior/variance table for these sizes."""
        key = (layer_h, layer_w, img_h, img_w)
        if key in self._cache:
            return self._cache[key]
        if self.img_h and self.img_w:
            img_h, img_w = self.img_h, self.img_w
        if self.step_h and self.step_w:
            step_h, step_w = _F32(self.step_h), _F32(self.step_w)
        else:
            step_w = _F32(_F32(img_w) / _F32(layer_w))
            step_h = _F32(_F32(img_h) / _F32(layer_h))
        off = _F32(self.offset)
        cx = ((np.arange(layer_w, dtype=np.float32) + off) * step_w).astype(np.float64)  # float, then double
        cy = ((np.arange(layer_h, dtype=np.float32) + off) * step_h).astype(np.float64)
        # (box_w, box_h) per prior in the fork's order; widths are float values.
        sizes: list[tuple[float, float]] = []
        for s, mn in enumerate(self.min_sizes):
            mn_i = int(mn)
            sizes.append((float(_F32(mn_i)), float(_F32(mn_i))))
            if self.max_sizes:
                mx_i = int(self.max_sizes[s])
                b = float(_F32(math.sqrt(mn_i * mx_i)))
                sizes.append((b, b))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                sq = _F32(np.sqrt(_F32(ar)))  # sqrt of a float is a float
                sizes.append((float(_F32(_F32(mn_i) * sq)), float(_F32(_F32(mn_i) / sq))))
        bw = np.array([s[0] for s in sizes], dtype=np.float64)
        bh = np.array([s[1] for s in sizes], dtype=np.float64)
        xmin = (cx[None, :, None] - bw[None, None, :] / 2.0) / img_w  # (1, W, P)
        xmax = (cx[None, :, None] + bw[None, None, :] / 2.0) / img_w
        ymin = (cy[:, None, None] - bh[None, None, :] / 2.0) / img_h  # (H, 1, P)
        ymax = (cy[:, None, None] + bh[None, None, :] / 2.0) / img_h
        shape = (layer_h, layer_w, len(sizes))
        boxes = np.stack([np.broadcast_to(xmin, shape), np.broadcast_to(ymin, shape),
                          np.broadcast_to(xmax, shape), np.broadcast_to(ymax, shape)], axis=-1)
        boxes = boxes.astype(np.float32).reshape(-1)
        if self.clip:
            boxes = np.minimum(np.maximum(boxes, _F32(0)), _F32(1))
        var = np.asarray(self.variance, dtype=np.float32)
        variances = np.tile(var, boxes.size // var.size) if var.size == 4 else np.full(boxes.size, var[0], np.float32)
        out = np.stack([boxes, variances]).astype(np.float32)
        self._cache[key] = out
        return out

    def forward(self, feat: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        _, _, lh, lw = _legacy4(tuple(feat.shape))
        _, _, ih, iw = _legacy4(tuple(image.shape))
        table = self.priors(lh, lw, ih, iw)
        return torch.from_numpy(table).to(device=feat.device, dtype=feat.dtype).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# SSD: DetectionOutput
# ---------------------------------------------------------------------------------------------
def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: int,
                 variance_encoded_in_target: bool) -> np.ndarray:
    """SSD's DecodeBBox for arrays: loc (..., P, 4), priors/variances (P, 4), all float32 and
    computed in the fork's float32 operation order. Returns (..., P, 4) [xmin, ymin, xmax, ymax]."""
    loc = loc.astype(np.float32, copy=False)
    pr = priors.astype(np.float32, copy=False)
    var = np.ones_like(variances, dtype=np.float32) if variance_encoded_in_target else variances.astype(np.float32)
    pxmin, pymin, pxmax, pymax = pr[:, 0], pr[:, 1], pr[:, 2], pr[:, 3]
    lx, ly, lw, lh = loc[..., 0], loc[..., 1], loc[..., 2], loc[..., 3]
    if code_type == _CodeType.CORNER:
        out = [pxmin + var[:, 0] * lx, pymin + var[:, 1] * ly, pxmax + var[:, 2] * lw, pymax + var[:, 3] * lh]
    elif code_type == _CodeType.CENTER_SIZE:
        pw = pxmax - pxmin
        ph = pymax - pymin
        pcx = (pxmin + pxmax) / _F32(2)
        pcy = (pymin + pymax) / _F32(2)
        cx = var[:, 0] * lx * pw + pcx
        cy = var[:, 1] * ly * ph + pcy
        with np.errstate(over="ignore"):
            w = np.exp(var[:, 2] * lw) * pw
            h = np.exp(var[:, 3] * lh) * ph
        out = [cx - w / _F32(2), cy - h / _F32(2), cx + w / _F32(2), cy + h / _F32(2)]
    elif code_type == _CodeType.CORNER_SIZE:
        pw = pxmax - pxmin
        ph = pymax - pymin
        out = [pxmin + var[:, 0] * lx * pw, pymin + var[:, 1] * ly * ph,
               pxmax + var[:, 2] * lw * pw, pymax + var[:, 3] * lh * ph]
    else:  # pragma: no cover - setup validates
        raise ValueError(f"unknown code type {code_type}")
    return np.stack(out, axis=-1).astype(np.float32)


def box_sizes(boxes: np.ndarray) -> np.ndarray:
    """SSD's BBoxSize (normalised): width*height in float32, 0 for an inverted box."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    bad = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return np.where(bad, _F32(0), w * h).astype(np.float32)


def jaccard(box: np.ndarray, size: np.float32, others: np.ndarray, other_sizes: np.ndarray) -> np.ndarray:
    """SSD's JaccardOverlap(box, other) for each of ``others`` (float32, the fork's rules: no
    intersection when disjoint, else intersection w*h when both are > 0, over the union of the
    stored sizes)."""
    disjoint = ((others[:, 0] > box[2]) | (others[:, 2] < box[0]) |
                (others[:, 1] > box[3]) | (others[:, 3] < box[1]))
    iw = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    ih = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    ok = ~disjoint & (iw > 0) & (ih > 0)
    inter = (iw * ih).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (size + other_sizes - inter)
    return np.where(ok, iou, _F32(0)).astype(np.float32)


def nms_fast(boxes: np.ndarray, sizes: np.ndarray, scores: np.ndarray, score_threshold: float,
             nms_threshold: float, eta: float, top_k: int) -> list[int]:
    """SSD's ApplyNMSFast: candidates with score > threshold, stably sorted by descending score,
    cut to ``top_k`` (when > -1); a candidate is kept when its overlap with every kept box is
    <= the adaptive threshold, which is multiplied by ``eta`` after each keep while it is > 0.5."""
    cand = np.nonzero(scores > _F32(score_threshold))[0]
    order = cand[np.argsort(-scores[cand].astype(np.float64), kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    kept: list[int] = []
    thr = _F32(nms_threshold)
    eta32 = _F32(eta)
    for idx in order:
        keep = True
        if kept:
            k = np.asarray(kept)
            ov = jaccard(boxes[idx], sizes[idx], boxes[k], sizes[k])
            keep = bool(np.all(ov <= thr))
        if keep:
            kept.append(int(idx))
            if eta < 1 and thr > 0.5:
                thr = _F32(thr * eta32)
    return kept


@register("DetectionOutput")
class DetectionOutput(Layer):
    """SSD's detection output (forward only): bottoms loc (N, P*L*4), conf (N, P*num_classes),
    priors (1, 2, P*4); top (1, 1, K, 7) rows [image_id, label, score, xmin, ymin, xmax, ymax].

    As the fork's CPU code: boxes decoded per ``code_type`` (no clipping); for each image and each
    non-background class, ApplyNMSFast (score > ``confidence_threshold``, -FLT_MAX when unset;
    stable descending sort; ``nms_param.top_k``; overlap <= threshold keeps; ``eta`` adaptation);
    if more than ``keep_top_k`` (> -1) survive, the best ``keep_top_k`` over all classes are kept.
    Rows are grouped by image, then label ascending, then descending score. When no image has a
    detection the top is (1, 1, N, 7) of -1 with column 0 = image index. The fork sorts with the
    unstable ``std::sort`` for ``keep_top_k``: equal scores at the cut may be chosen differently.
    ``save_output_param`` and ``visualize`` (file output, display) are accepted and ignored.
    """

    has_backward = False
    min_bottoms = max_bottoms = 3
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param: must specify num_classes")
        self.num_classes = int(p.num_classes)
        self.share_location = bool(p.share_location)
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background = int(p.background_label_id)
        self.code_type = int(p.code_type)
        if self.code_type not in (_CodeType.CORNER, _CodeType.CENTER_SIZE, _CodeType.CORNER_SIZE):
            raise self.error(f"detection_output_param: unknown code_type {self.code_type}")
        self.variance_encoded = bool(p.variance_encoded_in_target)
        self.keep_top_k = int(p.keep_top_k)
        self.conf_threshold = float(p.confidence_threshold) if p.HasField("confidence_threshold") else -FLT_MAX
        self.nms_threshold = float(p.nms_param.nms_threshold)
        if self.nms_threshold < 0:
            raise self.error("nms_param: nms_threshold must be non negative")
        self.eta = float(p.nms_param.eta)
        if not 0 < self.eta <= 1:
            raise self.error("nms_param: eta must be in (0, 1]")
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        if self.share_location and self.background == -1:
            raise self.error("share_location with background_label_id -1: the fork skips decoding the shared "
                             "boxes (label -1) and then aborts (\"Could not find location predictions\")")
        self._check(bottom_shapes)

    def _check(self, bottom_shapes: list[Shape]) -> None:
        loc, conf, prior = (_legacy4(s) for s in bottom_shapes)
        if loc[0] != conf[0]:
            raise self.error(f"loc and conf bottoms have different nums ({loc[0]} vs {conf[0]})")
        npri = prior[2] // 4
        loc_c = math.prod(bottom_shapes[0][1:])
        conf_c = math.prod(bottom_shapes[1][1:])
        if npri * self.num_loc_classes * 4 != loc_c:
            raise self.error(f"number of priors ({npri}) must match number of location predictions ({loc_c})")
        if npri * self.num_classes != conf_c:
            raise self.error(f"number of priors ({npri}) must match number of confidence predictions ({conf_c})")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(1, 1, 1, 7)]

    def detect(self, loc: np.ndarray, conf: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """The (K, 7) float32 detection rows for numpy bottoms."""
        num = loc.shape[0]
        npri = prior.shape[2] // 4 if prior.ndim >= 3 else prior.size // 8
        flat = prior.reshape(-1)
        pboxes = flat[: npri * 4].reshape(npri, 4).astype(np.float32)
        pvars = flat[npri * 4: npri * 8].reshape(npri, 4).astype(np.float32)
        locs = loc.reshape(num, npri, self.num_loc_classes, 4).astype(np.float32)
        confs = conf.reshape(num, npri, self.num_classes).astype(np.float32)
        per_image: list[dict[int, list[int]]] = []
        decoded_all: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        num_kept = 0
        for i in range(num):
            decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for c in range(self.num_loc_classes):
                label = -1 if self.share_location else c
                if label == self.background:
                    continue
                b = decode_boxes(locs[i, :, c], pboxes, pvars, self.code_type, self.variance_encoded)
                decoded[label] = (b, box_sizes(b))
            indices: dict[int, list[int]] = {}
            num_det = 0
            for c in range(self.num_classes):
                if c == self.background:
                    continue
                key = -1 if self.share_location else c
                boxes, sizes = decoded[key]
                keep = nms_fast(boxes, sizes, confs[i, :, c], self.conf_threshold, self.nms_threshold,
                                self.eta, self.top_k)
                indices[c] = keep
                num_det += len(keep)
            if self.keep_top_k > -1 and num_det > self.keep_top_k:
                pairs = [(float(confs[i, j, c]), c, j) for c in sorted(indices) for j in indices[c]]
                order = sorted(range(len(pairs)), key=lambda t: -pairs[t][0])[: self.keep_top_k]
                new: dict[int, list[int]] = {}
                for t in order:
                    _, c, j = pairs[t]
                    new.setdefault(c, []).append(j)
                indices = new
                num_kept += self.keep_top_k
            else:
                num_kept += num_det
            per_image.append(indices)
            decoded_all.append(decoded)
        if num_kept == 0:
            out = np.full((num, 7), -1, dtype=np.float32)
            out[:, 0] = np.arange(num)
            return out
        rows = []
        for i in range(num):
            for c in sorted(per_image[i]):
                boxes, _ = decoded_all[i][-1 if self.share_location else c]
                for j in per_image[i][c]:
                    rows.append([i, c, confs[i, j, c], *boxes[j]])
        return np.asarray(rows, dtype=np.float32).reshape(-1, 7)

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        self._check([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)])
        det = self.detect(loc.detach().cpu().float().numpy(), conf.detach().cpu().float().numpy(),
                          prior.detach().cpu().float().numpy())
        return torch.from_numpy(det).to(device=loc.device, dtype=loc.dtype).reshape(1, 1, -1, 7)


# ---------------------------------------------------------------------------------------------
# ShuffleNet: ShuffleChannel, ConvolutionDepthwise
# ---------------------------------------------------------------------------------------------
@register("ShuffleChannel")
class ShuffleChannel(Layer):
    """ShuffleNet's channel shuffle: channels viewed as (group, C/group) are transposed to
    (C/group, group), i.e. output channel ``j*group + i`` is input channel ``i*(C/group) + j``.
    ``group`` must divide the channels (the fork CHECKs it at forward)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.group = int(self.param.shuffle_channel_param.group)
        if self.group <= 0:
            raise self.error("shuffle_channel_param: group must be greater than 0")
        shape = bottom_shapes[0]
        if len(shape) < 2 or shape[1] % self.group:
            raise self.error(f"channels {shape[1] if len(shape) > 1 else '?'} are not a multiple of group {self.group}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        rest = x.shape[2:]
        y = x.reshape(n, self.group, c // self.group, -1).transpose(1, 2)
        return y.reshape(n, c, *rest)


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(Convolution):
    """caffe-mobilenet's depthwise convolution (``conv_dw_layer``): one k_h x k_w filter per input
    channel, weight (C, 1, k_h, k_w), bias (C,); the output has C channels whatever
    ``num_output`` says (the fork never reads it) and ``group`` is ignored. Geometry is the usual
    ``convolution_param`` (floor output size). The same numbers as a Convolution with
    ``group = num_output = C``."""

    max_bottoms = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.error(f"needs a 4-D (N, C, H, W) bottom, got {shape}")
        original = self.param
        lp = caffe_pb2.LayerParameter()
        lp.CopyFrom(original)
        lp.convolution_param.num_output = shape[1]
        lp.convolution_param.group = shape[1]
        lp.convolution_param.ClearField("axis")
        self.param = lp
        try:
            super().setup(bottom_shapes)
        finally:
            self.param = original


# ---------------------------------------------------------------------------------------------
# PSPNet: BN, Interp
# ---------------------------------------------------------------------------------------------
class _BNFn(torch.autograd.Function):
    """Non-frozen BN with the fork's backward in both phases: with x_hat the normalised input and
    g = slope * dy, dx = inv_std * (g - (x_hat * sum(x_hat*g) + sum(g)) / M) per channel
    (M = N*H*W), d slope = sum(x_hat*dy), d bias = sum(dy). In TRAIN this is autograd's batch-norm
    gradient; in TEST the fork still applies it to the moving-statistics x_hat."""

    @staticmethod
    def forward(ctx, x, slope, bias, mean, inv_std):
        xhat = (x - mean) * inv_std
        ctx.save_for_backward(xhat, slope, inv_std)
        return xhat * slope + bias

    @staticmethod
    def backward(ctx, dy):
        xhat, slope, inv_std = ctx.saved_tensors
        m = dy.shape[0] * dy.shape[2]
        dx = dslope = dbias = None
        if ctx.needs_input_grad[1]:
            dslope = (xhat * dy).sum(dim=(0, 2), keepdim=True)
        if ctx.needs_input_grad[2]:
            dbias = dy.sum(dim=(0, 2), keepdim=True)
        if ctx.needs_input_grad[0]:
            g = dy * slope
            s1 = (xhat * g).sum(dim=(0, 2), keepdim=True)
            s0 = g.sum(dim=(0, 2), keepdim=True)
            dx = (g - (xhat * s1 + s0) / m) * inv_std
        return dx, dslope, dbias, None, None


@register("BN")
class BN(Layer):
    """PSPNet's ``BN`` (``bn_param``: slope_filler, bias_filler, momentum, eps, frozen): blobs
    slope, bias, moving mean, moving variance, each (1, C, 1, 1).

    ``y = slope * (x - mean) / sqrt(var + eps) + bias`` per channel. With ``frozen`` or in TEST the
    stored mean/variance are used; otherwise (TRAIN) the batch mean and biased batch variance over
    N*H*W, and the moving blobs are updated as ``(1 - momentum) * batch + momentum * blob``.
    As the fork's LayerSetUp, the moving blobs get lr_mult/decay_mult 0 (so do slope and bias when
    ``frozen``), a new moving variance starts at 1 when frozen, else 0. Backward: frozen passes
    ``dy * slope / std`` only; otherwise the fork's batch-norm gradient is used (see ``_BNFn``).
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.bn_param
        self.frozen = bool(p.frozen)
        self.momentum = float(p.momentum)
        self.eps = float(p.eps)
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(f"needs a bottom with a channel axis, got {shape}")
        self.channels = _legacy4(shape)[1]
        bshape = (1, self.channels, 1, 1)
        self.add_blob(bshape, p.slope_filler)
        self.add_blob(bshape, p.bias_filler)
        self.add_blob(bshape, requires_grad=False)
        var = self.add_blob(bshape, requires_grad=False)
        if self.frozen:
            with torch.no_grad():
                var.fill_(1.0)
        # The fork's LayerSetUp rewrites the param specs: statistics (and, frozen, slope/bias) get
        # lr_mult and decay_mult 0.
        while len(self.param.param) < 4:
            self.param.param.add()
        zero = (2, 3, 0, 1) if self.frozen else (2, 3)
        for i in zero:
            self.param.param[i].lr_mult = 0.0
            self.param.param[i].decay_mult = 0.0

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        c = self.channels
        xr = x.reshape(n, c, -1)
        slope = self.blobs[0].reshape(1, c, 1)
        bias = self.blobs[1].reshape(1, c, 1)
        use_global = self.frozen or self.phase == TEST
        if use_global:
            mean = self.blobs[2].detach().reshape(1, c, 1)
            var = self.blobs[3].detach().reshape(1, c, 1)
        else:
            xd = xr.detach()
            mean = xd.mean(dim=(0, 2), keepdim=True)
            var = ((xd - mean) ** 2).mean(dim=(0, 2), keepdim=True)
            if self.phase == TRAIN:
                with torch.no_grad():
                    f = 1.0 - self.momentum
                    self.blobs[2].mul_(self.momentum).add_(mean.reshape(self.blobs[2].shape) * f)
                    self.blobs[3].mul_(self.momentum).add_(var.reshape(self.blobs[3].shape) * f)
        inv_std = torch.pow(var + self.eps, -0.5)
        if self.frozen:
            y = (xr - mean) * inv_std * slope + bias
        else:
            y = _BNFn.apply(xr, slope, bias, mean, inv_std)
        return y.reshape(x.shape)


@register("Interp")
class Interp(Layer):
    """DeepLab/PSPNet ``Interp``: bilinear resize with aligned corners (``interp_param``).

    The input is first cropped by ``pad_beg``/``pad_end`` (<= 0 only) to an effective size
    H_eff = H + pad_beg + pad_end; the output size comes from (first match) ``shrink_factor`` only:
    (H_eff - 1)/s + 1; ``zoom_factor`` only: H_eff + (H_eff - 1)(z - 1); ``height`` and ``width``;
    both factors: shrink then zoom; or (an extension some forks have) a second bottom's H, W.
    Sampling as ``caffe_cpu_interp2``: ratio (H_eff-1)/(H_out-1) in float (0 for H_out 1), source
    row = int(ratio*h) with its float fraction as weight, the next row clamped at the edge; equal
    sizes copy. Autograd gives the fork's adjoint backward (zero outside the crop).
    """

    min_bottoms = 1
    max_bottoms = 2
    min_tops = max_tops = 1
    no_grad_bottoms = (1,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.interp_param
        self.pad_beg = int(p.pad_beg)
        self.pad_end = int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error("interp_param: only non-positive pad_beg/pad_end (cropping) are supported")
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"needs a 4-D (N, C, H, W) bottom, got {bottom_shapes[0]}")
        self.top_shapes(bottom_shapes)  # validates

    def _out_size(self, bottom_shapes: list[Shape]) -> tuple[int, int, int, int]:
        p = self.param.interp_param
        h_in, w_in = bottom_shapes[0][2], bottom_shapes[0][3]
        h_eff = h_in + self.pad_beg + self.pad_end
        w_eff = w_in + self.pad_beg + self.pad_end
        has_s, has_z = p.HasField("shrink_factor"), p.HasField("zoom_factor")
        if has_s and p.shrink_factor < 1:
            raise self.error("interp_param: shrink factor must be positive")
        if has_z and p.zoom_factor < 1:
            raise self.error("interp_param: zoom factor must be positive")
        if has_s and not has_z:
            h_out, w_out = (h_eff - 1) // p.shrink_factor + 1, (w_eff - 1) // p.shrink_factor + 1
        elif has_z and not has_s:
            z = p.zoom_factor
            h_out, w_out = h_eff + (h_eff - 1) * (z - 1), w_eff + (w_eff - 1) * (z - 1)
        elif p.HasField("height") and p.HasField("width"):
            h_out, w_out = int(p.height), int(p.width)
        elif has_s and has_z:
            h_out, w_out = (h_eff - 1) // p.shrink_factor + 1, (w_eff - 1) // p.shrink_factor + 1
            h_out, w_out = h_out + (h_out - 1) * (p.zoom_factor - 1), w_out + (w_out - 1) * (p.zoom_factor - 1)
        elif len(bottom_shapes) == 2 and len(bottom_shapes[1]) == 4:
            h_out, w_out = bottom_shapes[1][2], bottom_shapes[1][3]
        else:
            raise self.error("interp_param: give zoom_factor, shrink_factor, or height and width")
        if h_eff <= 0 or w_eff <= 0:
            raise self.error(f"the cropped input size {h_eff}x{w_eff} must be positive")
        if h_out <= 0 or w_out <= 0:
            raise self.error(f"the output size {h_out}x{w_out} must be positive")
        return h_eff, w_eff, int(h_out), int(w_out)

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        n, c = bottom_shapes[0][:2]
        _, _, h_out, w_out = self._out_size(bottom_shapes)
        return [(n, c, h_out, w_out)]

    @staticmethod
    def axis_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(index0, index1, weight0, weight1) along one axis, float32 as ``caffe_cpu_interp2``."""
        r = _F32(_F32(size_in - 1) / _F32(size_out - 1)) if size_out > 1 else _F32(0)
        pos = (r * np.arange(size_out, dtype=np.float32)).astype(np.float32)
        i0 = pos.astype(np.int64)  # truncation, pos >= 0
        step = (i0 < size_in - 1).astype(np.int64)
        lam1 = (pos - i0.astype(np.float32)).astype(np.float32)
        lam0 = (_F32(1) - lam1).astype(np.float32)
        return i0, i0 + step, lam0, lam1

    def forward(self, x: torch.Tensor, *ref: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(x.shape)] + [tuple(r.shape) for r in ref]
        h_eff, w_eff, h_out, w_out = self._out_size(shapes)
        off = -self.pad_beg
        crop = x[:, :, off:off + h_eff, off:off + w_eff]
        if h_eff == h_out and w_eff == w_out:
            return crop.clone()
        h0, h1, hl0, hl1 = self.axis_weights(h_eff, h_out)
        w0, w1, wl0, wl1 = self.axis_weights(w_eff, w_out)
        dev, dt = x.device, x.dtype

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev)

        rows0 = crop.index_select(2, t(h0))
        rows1 = crop.index_select(2, t(h1))
        wi0, wi1 = t(w0), t(w1)
        a00, a01 = rows0.index_select(3, wi0), rows0.index_select(3, wi1)
        a10, a11 = rows1.index_select(3, wi0), rows1.index_select(3, wi1)
        wl0_t = t(wl0).to(dt).view(1, 1, 1, -1)
        wl1_t = t(wl1).to(dt).view(1, 1, 1, -1)
        hl0_t = t(hl0).to(dt).view(1, 1, -1, 1)
        hl1_t = t(hl1).to(dt).view(1, 1, -1, 1)
        return hl0_t * (wl0_t * a00 + wl1_t * a01) + hl1_t * (wl0_t * a10 + wl1_t * a11)


# ---------------------------------------------------------------------------------------------
# SegNet: Upsample
# ---------------------------------------------------------------------------------------------
class _UpsampleFn(torch.autograd.Function):
    """Max-unpooling on (N, C, H*W) with flat indices ``idx`` (int64) into (N, C, size).

    Forward: the fork's loop writes ``top[idx[i]] = x[i]`` in increasing i, so where several i share
    one position the last one wins; zeros elsewhere. Backward is the fork's gather
    ``dx[i] = dy[idx[i]]`` for every i (losers of a shared position included, so not autograd's)."""

    @staticmethod
    def forward(ctx, x, idx, size):
        ctx.save_for_backward(idx)
        src = torch.arange(idx.shape[-1], device=idx.device).expand_as(idx)
        win = torch.full((*idx.shape[:-1], size), -1, dtype=torch.int64, device=idx.device)
        win = win.scatter_reduce(2, idx, src, "amax")  # the last source i written to each position
        got = x.gather(2, win.clamp(min=0))
        return torch.where(win >= 0, got, torch.zeros_like(got))

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        return dy.gather(2, idx), None, None


@register("Upsample")
class Upsample(Layer):
    """SegNet's ``Upsample``: max-unpooling of bottom 0 through bottom 1, the mask top of a MAX
    Pooling (flat index into the unpooled H*W plane, as float; no gradient).

    Bottoms: two 4-D blobs of equal shape (N, C, H, W). Top (N, C, H_out, W_out) from
    ``upsample_h`` and ``upsample_w`` when both are given (each > 1), else (deprecated in the fork)
    ``scale`` (default 2) or ``scale_h`` and ``scale_w`` (each > 1) with
    ``H_out = H * scale_h - pad_out_h`` (``pad_out_*`` only with a scale of 2); giving ``scale``
    together with ``scale_h``/``scale_w``, or only one of these two, is the fork's setup error
    (unless ``upsample_h`` and ``upsample_w`` are both given). Each value goes to the flat position
    ``int(mask)`` of its (n, c) plane (truncated as ``static_cast<int>``), the last one in row-major
    order where several share a position, zeros elsewhere; positions outside [0, H_out*W_out) are an
    error (the fork aborts on ``>=`` and does not check negatives, e.g. the -1 of an empty window).
    Backward gathers the top diff at the mask positions (``dx[i] = dy[mask[i]]``), as the fork does.

    One difference from the fork: a scale-derived output size is recomputed when the bottoms are
    reshaped (the fork computes it at the first Reshape and keeps it).
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1
    no_grad_bottoms = (1,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.upsample_param
        has = p.HasField
        if not ((has("upsample_h") and has("upsample_w")) or (not has("scale") and has("scale_h") and has("scale_w"))
                or (not has("scale_h") and not has("scale_w"))):
            raise self.error("upsample_param: upsample_h & upsample_w are required, else (deprecated) "
                             "scale OR scale_h & scale_w")
        self.upsample_hw: tuple[int, int] | None = None
        self.scale_hw = (0, 0)
        self.pad_out = (0, 0)
        if has("upsample_h") and has("upsample_w"):
            uh, uw = int(p.upsample_h), int(p.upsample_w)
            if uh <= 1 or uw <= 1:
                raise self.error(f"upsample_param: upsample_h ({uh}) and upsample_w ({uw}) must be > 1")
            self.upsample_hw = (uh, uw)
        else:
            sh, sw = (int(p.scale), int(p.scale)) if not has("scale_h") else (int(p.scale_h), int(p.scale_w))
            if sh <= 1 or sw <= 1:
                which = "scale" if not has("scale_h") else "scale_h and scale_w"
                raise self.error(f"upsample_param: {which} must be > 1 (got {sh}, {sw})")
            ph, pw = int(bool(p.pad_out_h)), int(bool(p.pad_out_w))
            if ph and sh != 2:
                raise self.error("upsample_param: pad_out_h requires scale_h == 2 (the output size is ill-defined)")
            if pw and sw != 2:
                raise self.error("upsample_param: pad_out_w requires scale_w == 2 (the output size is ill-defined)")
            self.scale_hw = (sh, sw)
            self.pad_out = (ph, pw)
        self.top_shapes(bottom_shapes)  # validates the bottoms

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        a, m = (tuple(s) for s in bottom_shapes)
        if len(a) != 4 or len(m) != 4:
            raise self.error(f"input and mask must have 4 axes (num, channels, height, width), got {a} and {m}")
        if a != m:
            raise self.error(f"the mask shape {m} must equal the input shape {a}")
        n, c, h, w = a
        if self.upsample_hw is not None:
            uh, uw = self.upsample_hw
        else:
            uh = h * self.scale_hw[0] - self.pad_out[0]
            uw = w * self.scale_hw[1] - self.pad_out[1]
        return [(n, c, uh, uw)]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        (shape,) = self.top_shapes([tuple(x.shape), tuple(mask.shape)])
        n, c, uh, uw = shape
        idx = mask.detach().reshape(n, c, -1).to(torch.int64)  # truncation toward zero, as static_cast<int>
        if idx.numel() and not torch.jit.is_tracing():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= uh * uw:
                bad = lo if lo < 0 else hi
                raise self.error(f"upsample top index {bad} out of range [0, {uh * uw}) - check that the scale "
                                 "settings match the input pooling layer's downsample setup")
        out = run_function(_UpsampleFn, x.reshape(n, c, -1), idx, uh * uw)
        return out.reshape(shape)
