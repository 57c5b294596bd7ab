"""Caffe's WindowDataLayer (``src/caffe/layers/window_data_layer.cpp``): R-CNN window files.

A window file is a sequence of whitespace-separated tokens (read like C++ ``infile >>``)::

    # <image_index>
    <image path>            (``root_folder`` is prefixed verbatim)
    <channels> <height> <width>
    <num_windows>
    <class_index> <overlap> <x1> <y1> <x2> <y2>     (num_windows times, inclusive pixel corners)

A window with ``overlap >= fg_threshold`` is foreground (its class must be > 0); otherwise one with
``overlap < bg_threshold`` is background (label 0); anything in between is dropped. Windows refer to
their image by the header's ``image_index``, which Caffe uses as a *position* in the list of images.

Each batch holds ``N - int(N * fg_fraction)`` background windows followed by the foreground ones, each
drawn uniformly (with replacement) from its pool, then mirrored with probability 1/2 when
``transform_param.mirror``. The draws use a numpy Generator, not Caffe's boost mt19937 stream, so the
windows picked match Caffe in distribution only; everything after the draw is Caffe's arithmetic:

- ``context_pad > 0`` or ``crop_mode: "square"``: the box is grown about its centre by
  ``crop / (crop - 2*context_pad)`` (square: to the longer side first), in float32 and rounded half
  away from zero; the part outside the image is clipped off and becomes zero padding of
  ``round(pad * crop / unclipped_size)`` pixels (the left/right pads swap when mirrored); the clipped
  box is warped to ``round(clipped_size * crop / unclipped_size)`` pixels, shrunk to fit the crop;
- ``cv::resize`` (INTER_LINEAR) of the box, then ``cv::flip`` when mirrored, written at the pad offset
  into a zeroed ``crop x crop`` slot (the padding stays 0, it is not mean-subtracted);
- value = ``(pixel - mean) * scale`` in float32, where ``mean`` is the ``mean_file`` blob read at the
  *padded crop* coordinates shifted by ``mean_off = (mean_width - crop) / 2`` (on both axes; the
  mean is not mirrored), or the per-channel ``mean_value``, or nothing.

Parameters as Caffe 1.0 reads them: ``crop_size``, ``mirror``, ``mean_file`` and ``mean_value`` come
from ``transform_param``; ``scale`` comes from ``window_data_param`` (``transform_param.scale`` is
ignored by Caffe's WindowData). Images are always read as 3-channel BGR (``cv::IMREAD_COLOR``).
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffeport.errors import CaffeportError

__all__ = ["WindowFile", "read_window_file", "window_geometry", "WindowGeometry", "WindowBatches"]

# Columns of the window arrays.
IMAGE, LABEL, X1, Y1, X2, Y2 = range(6)


@dataclass
class WindowFile:
    """A parsed window file: ``images`` [(path as written + root_folder, (C, H, W), line)], and
    ``fg`` / ``bg`` windows as int64 arrays of rows (image_index, label, x1, y1, x2, y2)."""

    images: list[tuple[str, tuple[int, int, int], int]]
    fg: np.ndarray
    bg: np.ndarray
    channels: int  # the *last* image's channel count (Caffe shapes the data top with it)


class _Tokens:
    """C++ ``>>``-style whitespace tokens over the lines of a file, with line numbers, plus a fast
    path that parses a block of whole lines of numbers at once."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.li = 0
        self.pending: list[str] = []
        self.pending_line = 0

    def next(self) -> tuple[str, int] | None:
        while not self.pending:
            if self.li >= len(self.lines):
                return None
            self.pending = self.lines[self.li].split()
            self.pending.reverse()
            self.pending_line = self.li + 1
            self.li += 1
        return self.pending.pop(), self.pending_line

    def line(self) -> int:
        return self.pending_line if self.pending else self.li + 1

    def numbers(self, count: int, rows: int) -> np.ndarray | None:
        """The next ``count`` tokens as float64 when they are exactly the next ``rows`` whole lines."""
        if self.pending or rows <= 0 or self.li + rows > len(self.lines):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                a = np.fromstring(" ".join(self.lines[self.li : self.li + rows]), dtype=np.float64, sep=" ")
            except ValueError:
                return None
        if a.size != count:
            return None
        self.li += rows
        return a


def read_window_file(
    path: Path, root_folder: str, fg_threshold: float, bg_threshold: float, where: str
) -> WindowFile:
    """Parse a window file and split its windows into foreground/background as Caffe does."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CaffeportError(f"{where}: failed to open window file '{path}': {e.strerror}") from None
    except UnicodeDecodeError:
        raise CaffeportError(f"{where}: window file '{path}' is not a text file") from None
    toks = _Tokens(text.split("\n"))
    fg_thr, bg_thr = np.float32(fg_threshold), np.float32(bg_threshold)

    def bad(msg: str, line: int | None = None) -> CaffeportError:
        return CaffeportError(f"{where}: window file '{path}' line {line or toks.line()}: {msg}")

    def take(what: str) -> tuple[str, int]:
        t = toks.next()
        if t is None:
            raise bad(f"ended early: expected {what}")
        return t

    def take_int(what: str) -> int:
        tok, line = take(what)
        try:
            return int(tok)
        except ValueError:
            raise bad(f"expected an integer {what}, got '{tok}'", line) from None

    images: list[tuple[str, tuple[int, int, int], int]] = []
    fgs: list[np.ndarray] = []
    bgs: list[np.ndarray] = []
    channels = 0
    first = toks.next()
    if first is None:
        raise CaffeportError(f"{where}: window file '{path}' is empty")
    tok: tuple[str, int] | None = first
    while tok is not None:
        hashtag, line = tok
        if hashtag != "#":
            raise bad(f"expected '#' starting an image record, got '{hashtag}'", line)
        image_index = take_int("image index after '#'")
        name, name_line = take("an image path")
        size = (take_int("channels"), take_int("height"), take_int("width"))
        channels = size[0]
        images.append((root_folder + name, size, name_line))
        num = take_int("num_windows")
        if num < 0:
            raise bad(f"num_windows is negative ({num})")
        start_line = toks.line()
        arr = toks.numbers(6 * num, num)
        if arr is None:
            vals = []
            for _ in range(6 * num):
                t, tl = take("a window 'class_index overlap x1 y1 x2 y2'")
                try:
                    vals.append(float(t))
                except ValueError:
                    raise bad(f"expected a number in a window line, got '{t}'", tl) from None
            arr = np.asarray(vals, dtype=np.float64)
        arr = arr.reshape(num, 6)
        ints = arr[:, [0, 2, 3, 4, 5]]
        if not np.all(np.isfinite(ints)) or np.any(ints != np.round(ints)):
            raise bad(f"class_index and x1 y1 x2 y2 must be integers (the windows of image {image_index})",
                      start_line)
        overlap = arr[:, 1].astype(np.float32)
        rows = np.empty((num, 6), dtype=np.int64)
        rows[:, IMAGE] = image_index
        rows[:, LABEL] = ints[:, 0]
        rows[:, X1:] = ints[:, 1:]
        is_fg = overlap >= fg_thr
        is_bg = ~is_fg & (overlap < bg_thr)
        fg = rows[is_fg]
        if fg.size and fg[:, LABEL].min() <= 0:
            k = int(np.nonzero(is_fg & (rows[:, LABEL] <= 0))[0][0])
            raise bad(f"foreground window (overlap {float(overlap[k])} >= fg_threshold) needs a class "
                      f"index > 0, got {int(rows[k, LABEL])}", start_line + k)
        bg = rows[is_bg]
        bg[:, LABEL] = 0
        fgs.append(fg)
        bgs.append(bg)
        tok = toks.next()
    n_img = len(images)
    fg_all = np.concatenate(fgs) if fgs else np.empty((0, 6), np.int64)
    bg_all = np.concatenate(bgs) if bgs else np.empty((0, 6), np.int64)
    for arr in (fg_all, bg_all):
        if arr.size and (arr[:, IMAGE].min() < 0 or arr[:, IMAGE].max() >= n_img):
            badi = int(arr[(arr[:, IMAGE] < 0) | (arr[:, IMAGE] >= n_img)][0, IMAGE])
            raise CaffeportError(
                f"{where}: window file '{path}': image index {badi} is out of range; Caffe uses the "
                f"'# <index>' as the position in the list of {n_img} images (0-based, in file order)"
            )
    return WindowFile(images, fg_all, bg_all, channels)


# --------------------------------------------------------------------------------------------------


def _c_round(v: np.floating | float) -> int:
    """C's ``round``: half away from zero (exact for float32 values)."""
    x = float(v)
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


@dataclass(frozen=True)
class WindowGeometry:
    """Where one window goes: the clipped image box (inclusive), the warped size and its offset in
    the crop."""

    x1: int
    y1: int
    x2: int
    y2: int
    out_h: int
    out_w: int
    pad_h: int
    pad_w: int


def window_geometry(
    x1: int, y1: int, x2: int, y2: int, rows: int, cols: int, crop: int, context_pad: int, square: bool,
    mirror: bool,
) -> WindowGeometry:
    """Caffe's box expansion / clipping / padding arithmetic for one window (float32, as Dtype=float)."""
    f = np.float32
    out_w = out_h = crop
    pad_w = pad_h = 0
    if context_pad > 0 or square:
        context_scale = f(crop) / f(crop - 2 * context_pad)
        half_height = f((y2 - y1 + 1) / 2.0)
        half_width = f((x2 - x1 + 1) / 2.0)
        center_x = f(x1) + half_width
        center_y = f(y1) + half_height
        if square:
            if half_height > half_width:
                half_width = half_height
            else:
                half_height = half_width
        x1 = _c_round(center_x - half_width * context_scale)
        x2 = _c_round(center_x + half_width * context_scale)
        y1 = _c_round(center_y - half_height * context_scale)
        y2 = _c_round(center_y + half_height * context_scale)
        unclipped_height = y2 - y1 + 1
        unclipped_width = x2 - x1 + 1
        pad_x1 = max(0, -x1)
        pad_y1 = max(0, -y1)
        pad_x2 = max(0, x2 - cols + 1)
        pad_y2 = max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        clipped_height = y2 - y1 + 1
        clipped_width = x2 - x1 + 1
        if unclipped_width <= 0 or unclipped_height <= 0:
            return WindowGeometry(x1, y1, x2, y2, 0, 0, 0, 0)
        scale_x = f(crop) / f(unclipped_width)
        scale_y = f(crop) / f(unclipped_height)
        out_w = _c_round(f(clipped_width) * scale_x)
        out_h = _c_round(f(clipped_height) * scale_y)
        pad_x1 = _c_round(f(pad_x1) * scale_x)
        pad_x2 = _c_round(f(pad_x2) * scale_x)
        pad_y1 = _c_round(f(pad_y1) * scale_y)
        pad_h = pad_y1
        pad_w = pad_x2 if mirror else pad_x1  # the padding is mirrored too
        if pad_h + out_h > crop:
            out_h = crop - pad_h
        if pad_w + out_w > crop:
            out_w = crop - pad_w
    return WindowGeometry(x1, y1, x2, y2, out_h, out_w, pad_h, pad_w)


def _c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


class WindowBatches:
    """Batches of (data (N, 3, crop, crop), label (N,)) from a window file, as Caffe's ``load_batch``.

    ``mean`` is the mean_file blob (any shape; read through Caffe's legacy 4-D accessors) or None;
    ``mean_values`` one value or one per channel, or None. ``draw()`` picks the batch's windows and
    mirror flags (tests may replace it); ``render()`` produces one window's crop.
    """

    def __init__(
        self,
        windows: WindowFile,
        image_paths: list[Path],
        batch_size: int,
        crop: int,
        context_pad: int,
        crop_mode: str,
        mirror: bool,
        scale: float,
        fg_fraction: float,
        mean: np.ndarray | None,
        mean_values: np.ndarray | None,
        cache_images: bool,
        rng: np.random.Generator,
        where: str,
        workers: int = 4,
    ):
        self.w = windows
        self.paths = image_paths
        self.where = where
        self.batch_size = int(batch_size)
        self.crop = int(crop)
        self.context_pad = int(context_pad)
        self.square = crop_mode == "square"  # anything else warps, as in Caffe
        self.mirror = bool(mirror)
        self.scale = np.float32(scale)
        self.rng = rng
        self.channels = 3
        self.num_fg = int(np.float32(self.batch_size) * np.float32(fg_fraction))
        self.num_bg = self.batch_size - self.num_fg
        if self.num_fg < 0 or self.num_bg < 0:
            raise CaffeportError(f"{where}: fg_fraction {fg_fraction} gives {self.num_fg} foreground windows "
                                 f"of a batch of {self.batch_size}")
        if self.num_bg and not len(windows.bg):
            raise CaffeportError(
                f"{where}: a batch takes {self.num_bg} background windows but the window file has none "
                "with overlap < bg_threshold"
            )
        if self.num_fg and not len(windows.fg):
            raise CaffeportError(
                f"{where}: a batch takes {self.num_fg} foreground windows but the window file has none "
                "with overlap >= fg_threshold"
            )
        self.mean_flat: np.ndarray | None = None
        if mean is not None:
            s = tuple(mean.shape)
            if len(s) > 4:
                raise CaffeportError(f"{where}: mean_file blob has {len(s)} axes; Caffe reads it as 4-D")
            s = (1,) * (4 - len(s)) + s
            self.mean_h, self.mean_w = int(s[2]), int(s[3])
            self.mean_off = _c_div(self.mean_w - self.crop, 2)
            self.mean_flat = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        self.mean_values: np.ndarray | None = None
        if mean_values is not None:
            mv = np.asarray(mean_values, dtype=np.float32).reshape(-1)
            if len(mv) not in (1, self.channels):
                raise CaffeportError(f"{where}: {len(mv)} mean_value entries for {self.channels} channels; "
                                     "specify either 1 mean_value or as many as channels")
            self.mean_values = np.repeat(mv, self.channels) if len(mv) == 1 else mv
        self.cache: list[bytes] | None = None
        if cache_images:
            self.cache = []
            for i, p in enumerate(self.paths):
                try:
                    self.cache.append(p.read_bytes())
                except OSError as e:
                    raise CaffeportError(f"{where}: could not open or find image '{windows.images[i][0]}' "
                                         f"(looked for '{p}'): {e.strerror}") from None
        self.workers = int(workers)
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------------------------------
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, self.channels, self.crop, self.crop)

    def load_image(self, index: int) -> np.ndarray:
        """Image ``index`` as H,W,3 uint8 BGR (``cv::imread(IMREAD_COLOR)``, or the cached file bytes
        decoded with ``cv::imdecode``)."""
        import cv2

        if self.cache is not None:
            img = cv2.imdecode(np.frombuffer(self.cache[index], dtype=np.uint8), cv2.IMREAD_COLOR)
        else:
            img = cv2.imread(str(self.paths[index]), cv2.IMREAD_COLOR)
        if img is None:
            raise CaffeportError(
                f"{self.where}: could not open or decode image '{self.w.images[index][0]}' "
                f"(looked for '{self.paths[index]}')"
            )
        return img

    def draw(self) -> list[tuple[np.ndarray, bool]]:
        """The batch's (window row, do_mirror) pairs in Caffe's order: background first, then
        foreground; per item the window is drawn before the mirror flag."""
        out = []
        for pool, n in ((self.w.bg, self.num_bg), (self.w.fg, self.num_fg)):
            for _ in range(n):
                row = pool[int(self.rng.integers(len(pool)))]
                do_mirror = bool(self.mirror and self.rng.integers(2))
                out.append((row, do_mirror))
        return out

    def render(self, window: np.ndarray, do_mirror: bool, img: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        """One window's (3, crop, crop) float32 crop, written into ``out`` (zeroed by the caller)."""
        import cv2

        if img is None:
            img = self.load_image(int(window[IMAGE]))
        if out is None:
            out = np.zeros((self.channels, self.crop, self.crop), dtype=np.float32)
        rows, cols = img.shape[:2]
        x1, y1, x2, y2 = (int(v) for v in window[X1:])
        g = window_geometry(x1, y1, x2, y2, rows, cols, self.crop, self.context_pad, self.square, do_mirror)
        if not (0 <= g.x1 <= g.x2 < cols and 0 <= g.y1 <= g.y2 < rows) or g.out_h <= 0 or g.out_w <= 0:
            raise CaffeportError(
                f"{self.where}: window ({x1}, {y1}, {x2}, {y2}) of image '{self.w.images[int(window[IMAGE])][0]}' "
                f"({cols}x{rows}) cannot be cropped: the box (clipped to {g.x1}, {g.y1}, {g.x2}, {g.y2}) "
                f"must lie in the image and warp to a non-empty size (got {g.out_w}x{g.out_h})"
            )
        roi = img[g.y1 : g.y2 + 1, g.x1 : g.x2 + 1]
        warped = cv2.resize(roi, (g.out_w, g.out_h), interpolation=cv2.INTER_LINEAR)
        if do_mirror:
            warped = cv2.flip(warped, 1)
        if warped.ndim == 2:
            warped = warped[:, :, None]
        pix = warped.transpose(2, 0, 1)
        dst = out[:, g.pad_h : g.pad_h + g.out_h, g.pad_w : g.pad_w + g.out_w]
        if self.mean_flat is not None:
            mh, mw, off = self.mean_h, self.mean_w, self.mean_off
            c = np.arange(self.channels).reshape(-1, 1, 1)
            h = np.arange(g.out_h).reshape(1, -1, 1)
            w = np.arange(g.out_w).reshape(1, 1, -1)
            idx = (c * mh + h + off + g.pad_h) * mw + w + off + g.pad_w
            lo, hi = int(idx[0, 0, 0]), int(idx[-1, -1, -1])
            if lo < 0 or hi >= self.mean_flat.size:
                raise CaffeportError(
                    f"{self.where}: the mean_file blob ({mh}x{mw}) is too small for crop_size {self.crop} "
                    "(Caffe reads it centred at offset (mean_width - crop_size) / 2)"
                )
            np.subtract(pix, self.mean_flat[idx], out=dst, dtype=np.float32)
            np.multiply(dst, self.scale, out=dst)
        elif self.mean_values is not None:
            np.subtract(pix, self.mean_values[:, None, None], out=dst, dtype=np.float32)
            np.multiply(dst, self.scale, out=dst)
        else:
            np.multiply(pix, self.scale, out=dst, dtype=np.float32)
        return out

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        picks = self.draw()
        n = len(picks)
        data = np.zeros((n, self.channels, self.crop, self.crop), dtype=np.float32)
        labels = np.array([float(row[LABEL]) for row, _ in picks], dtype=np.float32)
        needed = sorted({int(row[IMAGE]) for row, _ in picks})
        use_pool = self.workers > 1 and n > 1
        if use_pool and self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="caffeport-window")
        run = self._pool.map if use_pool and self._pool is not None else map
        images = dict(zip(needed, run(self.load_image, needed)))

        def one(i: int) -> None:
            row, do_mirror = picks[i]
            self.render(row, do_mirror, images[int(row[IMAGE])], data[i])

        list(run(one, range(n)))
        return data, labels

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
