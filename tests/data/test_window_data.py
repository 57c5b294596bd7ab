"""WindowData (R-CNN window files) against a per-pixel re-implementation of window_data_layer.cpp."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeport.data.window import read_window_file, window_geometry
from caffeport.errors import CaffeportError
from caffeport.io import write_blobproto
from caffeport.layers.base import BuildContext, layer_class
from caffeport.proto import caffe_pb2

F = np.float32
CROP = 12

# (class, overlap, x1, y1, x2, y2) per image; image 0 is 40x50 (HxW), image 1 is 30x36.
WINDOWS = [
    [
        (3, 0.9, 10, 10, 17, 17),  # fg, inside
        (4, 0.7, 0, 0, 7, 7),  # fg, touches the top-left corner (context pad clips)
        (7, 0.1, 5, 20, 30, 39),  # bg (class forced to 0)
        (9, 0.4, 2, 2, 9, 9),  # between the thresholds: dropped
    ],
    [
        (2, 0.5, 30, 3, 35, 27),  # fg, tall and at the right edge
        (0, 0.0, 1, 1, 20, 12),  # bg
    ],
]
SIZES = [(40, 50), (30, 36)]
LAB = 1  # the label column of the window rows


def _write_window_file(root: Path, name: str = "windows.txt", one_line: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    imgs = []
    out = []
    for i, ((h, w), wins) in enumerate(zip(SIZES, WINDOWS)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "imgs" / f"im{i}.png"), img)
        imgs.append(img)
        out.append(f"# {i}\nim{i}.png\n3\n{h}\n{w}\n{len(wins)}\n")
        out.extend(" ".join(str(v) for v in win) + "\n" for win in wins)
    text = "".join(out)
    (root / name).write_text(" ".join(text.split()) if one_line else text)
    return imgs


@pytest.fixture()
def wdir(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    imgs = _write_window_file(tmp_path)
    return tmp_path, imgs


def _layer(root: Path, wparams: str = "", tparams: str = "", name: str = "win", ntop: int = 2,
           phase: int = caffe_pb2.TRAIN):
    lp = caffe_pb2.LayerParameter()
    tops = "".join(f' top: "t{i}"' for i in range(ntop))
    text_format.Merge(
        f'name: "{name}" type: "WindowData"{tops} transform_param {{ crop_size: {CROP} {tparams} }} '
        f'window_data_param {{ source: "windows.txt" root_folder: "imgs/" batch_size: 8 {wparams} }}', lp
    )
    return layer_class("WindowData")(lp, [], BuildContext(phase=phase, root=root, source="t.prototxt"))


# --- the reference: window_data_layer.cpp load_batch, step by step, one pixel at a time ---------------


def _c_round(v) -> int:
    v = float(v)
    return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))


def _ref_window(img, box, crop, context_pad, square, mirror, mean=None, mean_values=None, scale=1.0):
    x1, y1, x2, y2 = box
    rows, cols = img.shape[:2]
    pad_w = pad_h = 0
    size_w = size_h = crop
    if context_pad > 0 or square:
        context_scale = F(crop) / F(crop - 2 * context_pad)
        half_height = F(F(y2 - y1 + 1) / F(2))
        half_width = F(F(x2 - x1 + 1) / F(2))
        center_x = F(F(x1) + half_width)
        center_y = F(F(y1) + half_height)
        if square:
            if half_height > half_width:
                half_width = half_height
            else:
                half_height = half_width
        x1 = _c_round(F(center_x - F(half_width * context_scale)))
        x2 = _c_round(F(center_x + F(half_width * context_scale)))
        y1 = _c_round(F(center_y - F(half_height * context_scale)))
        y2 = _c_round(F(center_y + F(half_height * context_scale)))
        unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        clipped_height, clipped_width = y2 - y1 + 1, x2 - x1 + 1
        scale_x = F(crop) / F(unclipped_width)
        scale_y = F(crop) / F(unclipped_height)
        size_w = _c_round(F(F(clipped_width) * scale_x))
        size_h = _c_round(F(F(clipped_height) * scale_y))
        pad_x1 = _c_round(F(F(pad_x1) * scale_x))
        pad_x2 = _c_round(F(F(pad_x2) * scale_x))
        pad_y1 = _c_round(F(F(pad_y1) * scale_y))
        pad_h = pad_y1
        pad_w = pad_x2 if mirror else pad_x1
        size_h = min(size_h, crop - pad_h)
        size_w = min(size_w, crop - pad_w)
    cropped = cv2.resize(img[y1 : y2 + 1, x1 : x2 + 1].copy(), (size_w, size_h), interpolation=cv2.INTER_LINEAR)
    if mirror:
        cropped = cropped[:, ::-1]
    out = np.zeros((3, crop, crop), F)
    if mean is not None:
        mean_height, mean_width = mean.shape[1:]
        mean_flat = mean.reshape(-1)
        mean_off = int((mean_width - crop) / 2)
    for h in range(cropped.shape[0]):
        for w in range(cropped.shape[1]):
            for c in range(3):
                pixel = F(cropped[h, w, c])
                if mean is not None:
                    m = mean_flat[(c * mean_height + h + mean_off + pad_h) * mean_width + w + mean_off + pad_w]
                    v = F(F(pixel - m) * F(scale))
                elif mean_values is not None:
                    v = F(F(pixel - F(mean_values[c])) * F(scale))
                else:
                    v = F(pixel * F(scale))
                out[c, h + pad_h, w + pad_w] = v
    return out


# ------------------------------------------------------------------------------------------------------


def test_parse_split_and_token_format(wdir) -> None:
    root, _ = wdir
    wf = read_window_file(root / "windows.txt", "imgs/", 0.5, 0.5, "w")
    assert [im[0] for im in wf.images] == ["imgs/im0.png", "imgs/im1.png"]
    assert wf.fg.tolist() == [[0, 3, 10, 10, 17, 17], [0, 4, 0, 0, 7, 7], [1, 2, 30, 3, 35, 27]]
    assert wf.bg.tolist() == [[0, 0, 5, 20, 30, 39], [0, 0, 2, 2, 9, 9], [1, 0, 1, 1, 20, 12]]
    wf2 = read_window_file(root / "windows.txt", "imgs/", 0.5, 0.3, "w")
    assert [r[LAB] for r in wf2.bg.tolist()] == [0, 0] and len(wf2.fg) == 3  # overlap 0.4 dropped
    # C++ >> reads tokens, not lines: the whole file on one line parses the same
    _write_window_file(root, "one.txt", one_line=True)
    wf3 = read_window_file(root / "one.txt", "imgs/", 0.5, 0.5, "w")
    assert wf3.fg.tolist() == wf.fg.tolist() and wf3.bg.tolist() == wf.bg.tolist()


def test_geometry_by_hand() -> None:
    # crop 12, pad 2: context_scale 1.5. Box 0..7 (centre 4, half 4) grows to -2..10: 13 wide, 2 off
    # the image; 11 clipped pixels warp to round(11*12/13) = 10, the pad to round(2*12/13) = 2.
    g = window_geometry(0, 0, 7, 7, 40, 50, 12, 2, False, False)
    assert (g.x1, g.y1, g.x2, g.y2, g.out_h, g.out_w, g.pad_h, g.pad_w) == (0, 0, 10, 10, 10, 10, 2, 2)
    g = window_geometry(0, 0, 7, 7, 40, 50, 12, 2, False, True)  # mirrored: the right pad (0) goes left
    assert (g.pad_h, g.pad_w, g.out_w) == (2, 0, 10)
    # square, no pad: box 30..35 x 3..27 (6x25) becomes 25x25 about x centre 33 -> 20.5..45.5,
    # round half away: 21..46 (26 wide); 36-wide image clips 11 on the right
    g = window_geometry(30, 3, 35, 27, 30, 36, 12, 0, True, False)
    assert (g.x1, g.x2, g.y1, g.y2) == (21, 35, 3, 28)
    assert (g.out_w, g.pad_w) == (round(15 * 12 / 26), 0)
    g = window_geometry(10, 10, 17, 17, 40, 50, 12, 0, False, False)  # plain warp: the box itself
    assert (g.x1, g.y1, g.x2, g.y2, g.out_h, g.out_w, g.pad_h, g.pad_w) == (10, 10, 17, 17, 12, 12, 0, 0)


def test_shapes_labels_and_fg_fraction(wdir) -> None:
    root, _ = wdir
    torch.manual_seed(0)  # the layer's window draws are seeded from torch's generator
    layer = _layer(root, "fg_fraction: 0.3")
    assert layer.top_shapes([]) == [(8, 3, CROP, CROP), (8,)]
    n_fg = int(F(8) * F(0.3))  # 2
    seen = set()
    for _ in range(20):  # 40 fg draws from 3 windows: any one class missed with p < 1e-6
        data, label = layer.forward()
        assert tuple(data.shape) == (8, 3, CROP, CROP) and tuple(label.shape) == (8,)
        lab = label.numpy()
        assert (lab[: 8 - n_fg] == 0).all()  # background first
        assert set(lab[8 - n_fg :].tolist()) <= {2.0, 3.0, 4.0}
        seen |= set(lab.tolist())
    assert seen == {0.0, 2.0, 3.0, 4.0}  # every foreground class drawn, 9 (dropped) and 7 (bg) never
    layer.close()
    with pytest.raises(CaffeportError, match="has 1 tops, Caffe expects 2"):
        _layer(root, ntop=1)


CASES = [
    # (window_data_param, transform_param extras, mirror flags)
    ("", "", (False,)),
    ("context_pad: 2", "", (False, True)),
    ('crop_mode: "square"', "", (False, True)),
    ('crop_mode: "square" context_pad: 3 scale: 0.5', "mean_value: 100 mean_value: 50 mean_value: 20", (True,)),
    ("context_pad: 1 scale: 0.25", 'mean_file: "mean.binaryproto"', (False, True)),
]


@pytest.mark.parametrize("wparams,tparams,mirrors", CASES)
def test_window_pixels_match_reference(wdir, wparams, tparams, mirrors) -> None:
    root, imgs = wdir
    mean = np.random.default_rng(3).uniform(0, 255, (3, 18, 16)).astype(F)  # taller than wide
    write_blobproto(mean, root / "mean.binaryproto")
    layer = _layer(root, wparams, tparams + (" mirror: true" if True in mirrors else ""))
    lp = layer.param
    wp = lp.window_data_param
    mv = list(lp.transform_param.mean_value) or None
    mean_arg = mean if "mean_file" in tparams else None
    picks = []
    for i, wins in enumerate(WINDOWS):
        for win in wins:
            if win[0] == 9:
                continue
            for m in mirrors:
                row = np.array([i, win[0] if win[1] >= 0.5 else 0, *win[2:]], np.int64)
                expected = _ref_window(imgs[i], win[2:], CROP, wp.context_pad, wp.crop_mode == "square", m,
                                       mean_arg, mv, wp.scale)
                got = layer.batches.render(row, m)
                np.testing.assert_array_equal(got, expected, err_msg=f"image {i} window {win} mirror {m}")
                picks.append((row, m, expected))
    # the same through forward(), with the sampling forced
    batch = picks[:8] + picks[: max(0, 8 - len(picks))]
    layer.batches.draw = lambda: [(r, m) for r, m, _ in batch]
    data, label = layer.forward()
    for k, (r, _m, exp) in enumerate(batch):
        np.testing.assert_array_equal(data[k].numpy(), exp)
        assert label[k].item() == r[1]
    layer.close()


def test_context_pad_leaves_zero_border_without_mean(wdir) -> None:
    root, imgs = wdir
    layer = _layer(root, "context_pad: 2", "mean_value: 10")
    row = np.array([0, 4, 0, 0, 7, 7], np.int64)
    got = layer.batches.render(row, False)
    assert (got[:, :2, :] == 0).all() and (got[:, :, :2] == 0).all()  # padding is 0, not -mean
    layer.close()


def test_cache_images_same_pixels(wdir) -> None:
    root, _ = wdir
    a = _layer(root, "context_pad: 2")
    b = _layer(root, "context_pad: 2 cache_images: true")
    row = np.array([1, 2, 30, 3, 35, 27], np.int64)
    np.testing.assert_array_equal(a.batches.render(row, False), b.batches.render(row, False))
    os.remove(root / "imgs" / "im1.png")  # the cache holds the file's bytes
    np.testing.assert_array_equal(a.batches.render(np.array([0, 3, 10, 10, 17, 17]), True),
                                  b.batches.render(np.array([0, 3, 10, 10, 17, 17]), True))
    b.batches.render(row, False)
    with pytest.raises(CaffeportError, match=r"im1\.png"):
        a.batches.render(row, False)
    a.close()
    b.close()


def test_bad_inputs_name_layer_and_path(wdir) -> None:
    root, _ = wdir
    (root / "windows.txt").rename(root / "w_moved.txt")
    with pytest.raises(CaffeportError, match=r"layer 'win'.*windows\.txt"):
        _layer(root)
    (root / "w_moved.txt").rename(root / "windows.txt")
    os.remove(root / "imgs" / "im0.png")
    with pytest.raises(CaffeportError, match=r"layer 'win'.*imgs/im0\.png"):
        _layer(root)
    _write_window_file(root)
    (root / "windows.txt").write_text("# 0\nimgs/im0.png 3 40 50 1\n1 0.9 1 2 3\n")
    with pytest.raises(CaffeportError, match=r"windows\.txt.*ended early"):
        _layer(root, 'root_folder: ""')
    (root / "windows.txt").write_text("# 0\nim0.png 3 40 50 1\n0 0.9 1 2 3 4\n")
    with pytest.raises(CaffeportError, match=r"line 3.*class index > 0"):
        _layer(root)
    (root / "windows.txt").write_text("# 1\nim0.png 3 40 50 1\n1 0.9 1 2 3 4\n")
    with pytest.raises(CaffeportError, match="image index 1 is out of range"):
        _layer(root)
    (root / "windows.txt").write_text("# 0\nim0.png 3 40 50 1\n1 0.9 1 2 3 4\n")
    with pytest.raises(CaffeportError, match="none with overlap < bg_threshold"):
        _layer(root)
    with pytest.raises(CaffeportError, match="crop_size"):
        lp = caffe_pb2.LayerParameter()
        text_format.Merge('name: "win" type: "WindowData" top: "a" top: "b" window_data_param '
                          '{ source: "windows.txt" batch_size: 2 crop_size: 5 }', lp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer_class("WindowData")(lp, [], BuildContext(root=root, source="t.prototxt"))
    # a window outside the image (no context pad to clip it) fails at batch time, naming the image
    (root / "windows.txt").write_text("# 0\nim0.png 3 40 50 2\n1 0.9 40 2 60 9\n0 0.1 1 2 3 4\n")
    layer = _layer(root)
    with pytest.raises(CaffeportError, match=r"im0\.png"):
        layer.forward()
    layer.close()
