"""An independent, minimal shape propagator for deploy nets: predicts the parameter-blob shapes
Caffe would create (conv, inner product, PReLU, BatchNorm, Scale, Normalize) from layer params.

Used to check that weights decoded from real caffemodels have the shapes their prototxt implies.
Layers it does not understand make their tops unknown; checks depending on them are skipped.
"""

from __future__ import annotations

import math

from caffeport.proto import caffe_pb2


def _pair(rep, single_h, single_w, default):
    if single_h or single_w:
        return single_h, single_w
    vals = list(rep) or [default]
    return (vals[0], vals[-1]) if len(vals) > 1 else (vals[0], vals[0])


def expected_param_shapes(net: caffe_pb2.NetParameter) -> dict[str, list[tuple[int, ...]]]:
    shapes: dict[str, tuple[int, ...] | None] = {}
    out: dict[str, list[tuple[int, ...]]] = {}
    for lp in net.layer:
        if lp.include and all(r.HasField("phase") and r.phase == caffe_pb2.TRAIN for r in lp.include):
            continue
        bots = [shapes.get(b) for b in lp.bottom]
        b0 = bots[0] if bots else None
        t = lp.type
        tops: list[tuple[int, ...] | None] = [None] * len(lp.top)
        if t == "Input":
            tops = [tuple(s.dim) for s in lp.input_param.shape]
            if len(tops) == 1 and len(lp.top) > 1:
                tops = tops * len(lp.top)
        elif t in ("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution") and b0 is not None:
            cp = lp.convolution_param
            kh, kw = _pair(cp.kernel_size, cp.kernel_h, cp.kernel_w, 1)
            ph, pw = _pair(cp.pad, cp.pad_h, cp.pad_w, 0)
            sh, sw = _pair(cp.stride, cp.stride_h, cp.stride_w, 1)
            dh, dw = _pair(cp.dilation, 0, 0, 1)
            group = cp.group if t == "Convolution" else b0[1]
            n = cp.num_output
            blobs = [(n, b0[1] // group, kh, kw)]
            if cp.bias_term:
                blobs.append((n,))
            out[lp.name] = blobs
            oh = (b0[2] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
            ow = (b0[3] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
            tops = [(b0[0], n, oh, ow)]
        elif t == "Pooling" and b0 is not None:
            pp = lp.pooling_param
            if pp.global_pooling:
                tops = [(b0[0], b0[1], 1, 1)]
            else:
                kh, kw = (pp.kernel_h, pp.kernel_w) if pp.kernel_h else (pp.kernel_size, pp.kernel_size)
                ph, pw = (pp.pad_h, pp.pad_w) if (pp.pad_h or pp.pad_w) else (pp.pad, pp.pad)
                sh, sw = (pp.stride_h, pp.stride_w) if pp.stride_h else (pp.stride, pp.stride)
                rnd = math.ceil if pp.round_mode == caffe_pb2.PoolingParameter.CEIL else math.floor
                oh = int(rnd((b0[2] + 2 * ph - kh) / sh)) + 1
                ow = int(rnd((b0[3] + 2 * pw - kw) / sw)) + 1
                if ph and (oh - 1) * sh >= b0[2] + ph:
                    oh -= 1
                if pw and (ow - 1) * sw >= b0[3] + pw:
                    ow -= 1
                tops = [(b0[0], b0[1], oh, ow)]
        elif t == "InnerProduct" and b0 is not None:
            ip = lp.inner_product_param
            axis = ip.axis % len(b0)
            k = math.prod(b0[axis:])
            n = ip.num_output
            out[lp.name] = [(k, n) if ip.transpose else (n, k)] + ([(n,)] if ip.bias_term else [])
            tops = [tuple(b0[:axis]) + (n,)]
        elif t == "PReLU" and b0 is not None:
            out[lp.name] = [() if lp.prelu_param.channel_shared else (b0[1],)]
            tops = [b0]
        elif t == "BatchNorm" and b0 is not None:
            out[lp.name] = [(b0[1],), (b0[1],), (1,)]
            tops = [b0]
        elif t == "Scale" and b0 is not None and len(lp.bottom) == 1:
            sp = lp.scale_param
            out[lp.name] = [(b0[1],)] + ([(b0[1],)] if sp.bias_term else [])
            tops = [b0]
        elif t == "Normalize" and b0 is not None:
            out[lp.name] = [(1,) if lp.norm_param.channel_shared else (b0[1],)]
            tops = [b0]
        elif t in ("ReLU", "TanH", "Sigmoid", "AbsVal", "Dropout", "LRN", "Softmax", "Power", "ELU", "BNLL"):
            tops = [b0] * len(lp.top)
        elif t == "Eltwise":
            tops = [b0]
        elif t == "Concat" and all(b is not None for b in bots) and bots:
            axis = lp.concat_param.axis if lp.concat_param.HasField("axis") else lp.concat_param.concat_dim
            axis %= len(b0)
            tot = sum(b[axis] for b in bots)
            tops = [tuple(b0[:axis]) + (tot,) + tuple(b0[axis + 1 :])]
        elif t == "Flatten" and b0 is not None:
            tops = [(b0[0], math.prod(b0[1:]))]
        elif t == "Slice" and b0 is not None:
            sp = lp.slice_param
            axis = (sp.axis if sp.HasField("axis") else sp.slice_dim) % len(b0)
            pts = list(sp.slice_point)
            if not pts:
                pts = [b0[axis] * (i + 1) // len(lp.top) for i in range(len(lp.top) - 1)]
            edges = [0, *pts, b0[axis]]
            tops = [tuple(b0[:axis]) + (edges[i + 1] - edges[i],) + tuple(b0[axis + 1 :]) for i in range(len(lp.top))]
        for name, s in zip(lp.top, tops):
            shapes[name] = s
        for name in lp.top[len(tops) :]:
            shapes[name] = None
    return out


def align_end(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Caffe's ShapeEquals for legacy 4-D blobs: equal after dropping leading 1s of the legacy one."""
    if a == b:
        return True
    if len(a) == 4 and len(b) <= 4:
        return all(d == 1 for d in a[: 4 - len(b)]) and tuple(a[4 - len(b) :]) == tuple(b)
    return False
