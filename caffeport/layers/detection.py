"""Detection layers from Caffe forks: ROIPooling (rbgirshick/caffe-fast-rcnn)."""

from __future__ import annotations

import torch

from caffeport.layers.base import Layer, Shape, register

_CHUNK_ELEMS = 1 << 25  # bound on the (R, C, h, PW, w) intermediate of one chunk of ROIs


def _c_round(v: torch.Tensor) -> torch.Tensor:
    """C's round(): halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


class _ROIPoolFn(torch.autograd.Function):
    """Gradient of each pooled cell goes to its argmax, but only where Caffe's backward finds it:
    the argmax must lie inside the ROI box and the cell must be in the feasible range that
    Caffe's backward recomputes (float32) for that pixel."""

    @staticmethod
    def forward(ctx, x, rois, layer):
        out, argmax_flat, allowed = layer._pool(x, rois)
        ctx.save_for_backward(argmax_flat, allowed)
        ctx.xshape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        argmax_flat, allowed = ctx.saved_tensors
        gx = torch.zeros(ctx.xshape.numel(), dtype=grad_out.dtype, device=grad_out.device)
        g = (grad_out * allowed).reshape(-1)
        idx = argmax_flat.reshape(-1).clamp(min=0)
        gx.index_add_(0, idx, g)
        return gx.reshape(ctx.xshape), None, None


@register("ROIPooling")
class ROIPooling(Layer):
    """Fast R-CNN ROI max pooling: rois (R, 5) = [batch, x1, y1, x2, y2] in image coordinates,
    scaled by ``spatial_scale`` and rounded half away from zero; ROI size max(end - start + 1, 1);
    bin ph spans [floor(ph*bin), ceil((ph+1)*bin)) computed in float32, clipped to the map; empty
    bins give 0; ties keep the first maximum in row-major order. Unlike ``torchvision.ops.roi_pool``
    the gradient follows Caffe's backward exactly (argmax inside the ROI box only); none to rois.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1
    no_grad_bottoms = (1,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        p = self.param.roi_pooling_param if self.param.HasField("roi_pooling_param") else None
        self.pooled_h = int(p.pooled_h) if p is not None else 0
        self.pooled_w = int(p.pooled_w) if p is not None else 0
        self.spatial_scale = float(p.spatial_scale) if p is not None else 1.0
        if self.pooled_h <= 0 or self.pooled_w <= 0:
            raise self.error("roi_pooling_param: pooled_h and pooled_w must be > 0")
        if len(bottom_shapes[0]) != 4:
            raise self.error(f"the feature map must be 4-D (N, C, H, W), got {bottom_shapes[0]}")
        rs = bottom_shapes[1]
        if len(rs) < 1 or (int(torch.tensor(rs[1:]).prod()) if len(rs) > 1 else 1) != 5:
            raise self.error(f"rois must be (R, 5) = [batch, x1, y1, x2, y2], got {rs}")

    def top_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(bottom_shapes[1][0], bottom_shapes[0][1], self.pooled_h, self.pooled_w)]

    def _bins(self, start: torch.Tensor, size: torch.Tensor, n_bins: int, limit: int):
        """Per ROI and bin: clipped [start, end) (int64), from Caffe's float32 bin arithmetic."""
        bin_size = size.to(torch.float32) / torch.tensor(float(n_bins), dtype=torch.float32)
        p = torch.arange(n_bins, device=start.device, dtype=torch.float32)
        lo = torch.floor(p[None, :] * bin_size[:, None]).to(torch.int64)
        hi = torch.ceil((p[None, :] + 1) * bin_size[:, None]).to(torch.int64)
        lo = (lo + start[:, None]).clamp(0, limit)
        hi = (hi + start[:, None]).clamp(0, limit)
        return lo, hi, bin_size

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return _ROIPoolFn.apply(x, rois.detach(), self)

    def _pool(self, x: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top, flat argmax index into x (0 where empty), gradient mask as x.dtype)."""
        N, C, H, W = x.shape
        PH, PW = self.pooled_h, self.pooled_w
        rois = rois.detach().reshape(rois.shape[0], 5).to(torch.float32)
        R = rois.shape[0]
        dev = x.device
        if R == 0:
            z = x.new_zeros((0, C, PH, PW))
            return z, z.to(torch.int64), z
        b = rois[:, 0].to(torch.int64)  # C++ float -> int truncation
        scale = torch.tensor(self.spatial_scale, dtype=torch.float32, device=dev)
        xs, ys, xe, ye = (_c_round(rois[:, i] * scale).to(torch.int64) for i in (1, 2, 3, 4))
        if bool(((b < 0) | (b >= N)).any()):
            raise self.error(f"a ROI's batch index is outside [0, {N})")
        rh = torch.clamp(ye - ys + 1, min=1)
        rw = torch.clamp(xe - xs + 1, min=1)
        hlo, hhi, bsh = self._bins(ys, rh, PH, H)  # (R, PH)
        wlo, whi, bsw = self._bins(xs, rw, PW, W)  # (R, PW)

        # Row/column window of each ROI covering all its bins.
        h0 = hlo.min(1).values
        w0 = wlo.min(1).values
        hh = int((hhi.max(1).values - h0).clamp(min=1).max())
        ww = int((whi.max(1).values - w0).clamp(min=1).max())
        ar_h = torch.arange(hh, device=dev)
        ar_w = torch.arange(ww, device=dev)

        out = x.new_empty((R, C, PH, PW))
        argmax = torch.empty((R, C, PH, PW), dtype=torch.int64, device=dev)
        chunk = max(1, _CHUNK_ELEMS // max(1, C * hh * ww * max(PH, PW)))
        xd = x.detach()
        for r0 in range(0, R, chunk):
            sl = slice(r0, min(R, r0 + chunk))
            rows = h0[sl, None] + ar_h[None, :]  # (r, hh)
            cols = w0[sl, None] + ar_w[None, :]  # (r, ww)
            feat = xd[b[sl, None, None], :, rows.clamp(max=H - 1)[:, :, None], cols.clamp(max=W - 1)[:, None, :]]
            feat = feat.permute(0, 3, 1, 2)  # (r, C, hh, ww)
            mw = (cols[:, None, :] >= wlo[sl, :, None]) & (cols[:, None, :] < whi[sl, :, None])  # (r, PW, ww)
            mh = (rows[:, None, :] >= hlo[sl, :, None]) & (rows[:, None, :] < hhi[sl, :, None])  # (r, PH, hh)
            v = feat[:, :, :, None, :].masked_fill(~mw[:, None, None, :, :], -torch.inf)  # (r, C, hh, PW, ww)
            m1, a1 = v.max(dim=-1)  # (r, C, hh, PW): first max along w
            u = m1[:, :, None, :, :].masked_fill(~mh[:, None, :, :, None], -torch.inf)  # (r, C, PH, hh, PW)
            m2, a2 = u.max(dim=3)  # (r, C, PH, PW): first row holding the max
            wsel = a1.gather(2, a2)  # (r, C, PH, PW): column within that row
            hidx = rows[:, None, None, None, :].expand(-1, C, PH, PW, -1).gather(4, a2[..., None])[..., 0]
            widx = cols[:, None, None, :].expand(-1, C, PH, -1).gather(3, wsel)
            out[sl] = m2
            argmax[sl] = hidx * W + widx
        empty = (hhi <= hlo)[:, :, None] | (whi <= wlo)[:, None, :]  # (R, PH, PW)
        empty = empty[:, None].expand(R, C, PH, PW)
        out = torch.where(empty, torch.zeros_like(out), out)
        argmax = torch.where(empty, torch.full_like(argmax, -1), argmax)

        # Where Caffe's backward sends the cell's gradient (see _ROIPoolFn).
        ah, aw = argmax // W, argmax % W
        ys4, ye4, xs4, xe4 = (t[:, None, None, None] for t in (ys, ye, xs, xe))
        inside = (argmax >= 0) & (ah >= ys4) & (ah <= ye4) & (aw >= xs4) & (aw <= xe4)
        fh = bsh[:, None, None, None]
        fw = bsw[:, None, None, None]
        phs = torch.floor((ah - ys4).to(torch.float32) / fh).to(torch.int64).clamp(0, PH)
        phe = torch.ceil((ah - ys4 + 1).to(torch.float32) / fh).to(torch.int64).clamp(0, PH)
        pws = torch.floor((aw - xs4).to(torch.float32) / fw).to(torch.int64).clamp(0, PW)
        pwe = torch.ceil((aw - xs4 + 1).to(torch.float32) / fw).to(torch.int64).clamp(0, PW)
        ph = torch.arange(PH, device=dev)[None, None, :, None]
        pw = torch.arange(PW, device=dev)[None, None, None, :]
        allowed = inside & (ph >= phs) & (ph < phe) & (pw >= pws) & (pw < pwe)
        flat = (b[:, None, None, None] * C + torch.arange(C, device=dev)[None, :, None, None]) * (H * W) + argmax
        flat = torch.where(argmax >= 0, flat, torch.zeros_like(flat))
        return out, flat, allowed.to(x.dtype)
