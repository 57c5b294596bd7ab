"""``make demo``: the cats-vs-dogs transfer-learning tutorial, end to end, on bundled synthetic pets.

Adil Moujahid's "A practical introduction to deep learning with Caffe and Python", section 5, as
caffeport runs it with no Caffe installed, in a few minutes on a laptop CPU::

    python -m caffeport.demo            # or: make demo   (everything goes to demo_out/)

Step by step (each step prints where its artefact is):

1. draw the image set: ``input/train/{cat,dog}.<n>.jpg`` and a held-out ``input/test1/<n>.jpg``
   (cartoon pets, see :func:`draw_pet`; Kaggle's photos cannot be bundled);
2. ``create-lmdb``: histogram equalisation, 227x227 INTER_CUBIC, 5/6 train vs 1/6 validation
   (``input/train_lmdb``, ``input/validation_lmdb``), exactly as the tutorial's ``create_lmdb.py``;
3. ``compute-image-mean`` -> ``input/mean.binaryproto``;
4. a stand-in for ``bvlc_reference_caffenet.caffemodel`` (233 MB; not bundled): BVLC's CaffeNet with
   its layer names (conv1..conv5, fc6, fc7, fc8 with 1000 outputs), conv1 seeded with an oriented
   edge/colour filter bank, every layer scaled to unit-variance outputs, then briefly pre-trained by
   caffeport's solver on eight synthetic *non*-pet classes; with the real file, pass it instead
   (``--weights``);
5. fine-tune ``solver_demo.prototxt`` with ``--weights`` the stand-in, as ``caffeport train`` does
   (glog log in ``model_demo_train.log``): conv1..conv5 frozen (``lr_mult: 0``), fc6/fc7 copied and
   trained, ``fc8-cats-dogs`` new (no layer of that name in the weights, so it starts from its
   fillers);
6. the learning curve (``plot-log``) and the log as CSV (``parse-log``);
7. ``predict`` the held-out images into a Kaggle submission (``id,label`` = probability of dog);
8. ``draw`` the net (Graphviz PNG, or the ``.dot`` text when Graphviz is missing) and
   ``export-onnx`` the deploy net with the fine-tuned weights.

It then checks what the tutorial promises: validation accuracy far above chance, conv1..conv5 byte
for byte the stand-in's, ``fc8-cats-dogs`` not taken from the weights file; and exits 1 if not.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.io.atomic import atomic_write

__all__ = [
    "draw_pet",
    "draw_pretext",
    "PRETEXT_CLASSES",
    "write_pet_images",
    "PetImageSet",
    "write_pretext_lmdb",
    "conv1_filter_bank",
    "make_standin_caffemodel",
    "train_with_solver",
    "DemoReport",
    "run_demo",
    "main",
    "samples_dir",
]

# --------------------------------------------------------------------------------------------------
# The image set: cartoon cats and dogs (and the stand-in's pretext classes)
#
# - cats: a round head with two *pointed* ears on top, *striped* (tabby) fur, almond eyes with slit
#   pupils, a small pink nose and whiskers;
# - dogs: a longer head with two *floppy* ears hanging at the sides, *spotted* fur, round eyes, a
#   muzzle with a big dark nose.
# Fur colours come from one palette shared by both classes; size, position, tilt, background and
# clutter are random, so a net has to look at shape and texture, not colour. Every image is a function
# of (seed, kind, index) only: identical on every machine, and one image can be redrawn on its own.

# BGR fur colours shared by both classes.
_FUR = [(40, 110, 220), (128, 128, 128), (30, 60, 110), (35, 35, 35), (225, 225, 230), (150, 200, 235),
        (70, 90, 150), (100, 100, 90)]

PRETEXT_CLASSES = ("disc", "square", "triangle", "horizontal bars", "checkerboard", "rings", "cross", "grid")


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    salt = sum((i + 1) * ord(c) for i, c in enumerate(kind))
    return np.random.default_rng([int(seed), salt, int(index)])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    import cv2

    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    s = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    a = rng.uniform(0, 1)
    mix = a * t + (1 - a) * s
    img = c0 * (1 - mix) + c1 * mix
    img = img + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):  # clutter: furniture-ish rectangles and lines
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.uniform() < 0.5:
            cv2.rectangle(img, (x0, y0), (x1, y1), col, -1)
        else:
            cv2.line(img, (x0, y0), (x1, y1), col, int(rng.integers(1, 5)), cv2.LINE_AA)
    return img


def _fur_texture(rng: np.random.Generator, h: int, w: int, fur: np.ndarray, striped: bool) -> np.ndarray:
    """A fur layer: tabby stripes for cats, spots for dogs."""
    import cv2

    dark = np.clip(fur * rng.uniform(0.25, 0.5), 0, 255)
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = fur
    if striped:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = rng.uniform(0, math.pi)
        period = rng.uniform(7, 13)
        wave = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period
                      + 1.5 * np.sin(yy / rng.uniform(15, 30)))
        m = (wave > 0.2).astype(np.float32)[..., None]
        tex = tex * (1 - m) + dark * m
    else:
        tex_u8 = np.clip(tex, 0, 255).astype(np.uint8)
        col = tuple(float(v) for v in dark)
        for _ in range(int(rng.integers(8, 18))):
            r = int(rng.integers(max(3, w // 30), max(5, w // 9)))
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
            axes = (r, int(r * rng.uniform(0.6, 1.0)))
            cv2.ellipse(tex_u8, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
        tex = tex_u8.astype(np.float32)
    tex += rng.normal(0, 8, (h, w, 3)).astype(np.float32)
    return np.clip(tex, 0, 255).astype(np.uint8)


def draw_pet(kind: str, index: int, seed: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
    """Draw one ``'cat'`` or ``'dog'`` as an H,W,3 uint8 BGR image (random size ~160-300 px unless
    ``size=(h, w)``)."""
    import cv2

    if kind not in ("cat", "dog"):
        raise ValueError(f"kind must be 'cat' or 'dog', got {kind!r}")
    rng = _rng(seed, kind, index)
    h, w = size if size else (int(rng.integers(160, 300)), int(rng.integers(160, 300)))
    img = _background(rng, h, w)
    cat = kind == "cat"
    s = min(h, w) * rng.uniform(0.28, 0.38)  # head radius
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.08, 0.12) * h
    tilt = rng.uniform(-20, 20)
    fur = np.asarray(_FUR[int(rng.integers(len(_FUR)))], np.float32) * rng.uniform(0.85, 1.15)
    mask = np.zeros((h, w), np.uint8)
    rot = cv2.getRotationMatrix2D((cx, cy), tilt, 1.0)

    def pt(x: float, y: float) -> tuple[int, int]:
        v = rot @ np.array([x, y, 1.0])
        return int(round(v[0])), int(round(v[1]))

    def ell(mk: np.ndarray, x: float, y: float, ax: float, ay: float, ang: float, col: object) -> None:
        cv2.ellipse(mk, pt(x, y), (max(1, int(ax)), max(1, int(ay))), ang - tilt, 0, 360, col, -1, cv2.LINE_AA)

    if cat:
        ell(mask, cx, cy, s, s * rng.uniform(0.85, 0.95), 0, 255)
        for side in (-1, 1):  # pointed ears
            base = [(cx + side * s * 0.25, cy - s * 0.65), (cx + side * s * 0.95, cy - s * 0.25)]
            tip = (cx + side * s * rng.uniform(0.7, 0.9), cy - s * rng.uniform(1.35, 1.6))
            tri = np.array([pt(*base[0]), pt(*base[1]), pt(*tip)], np.int32)
            cv2.fillConvexPoly(mask, tri, 255, cv2.LINE_AA)
    else:
        ell(mask, cx, cy, s * 0.85, s * 1.05, 0, 255)
        ell(mask, cx, cy + s * 0.55, s * 0.55, s * 0.45, 0, 255)  # muzzle
    tex = _fur_texture(rng, h, w, fur, striped=cat)
    m = (mask.astype(np.float32) / 255.0)[..., None]
    img = (img * (1 - m) + tex * m).astype(np.uint8)
    ear_col = tuple(float(v) for v in np.clip(fur * 0.45, 0, 255))
    if not cat:  # floppy ears hang over the sides of the head
        for side in (-1, 1):
            ell(img, cx + side * s * 0.85, cy + s * 0.05, s * 0.28, s * 0.7, side * -15, ear_col)
    # eyes
    for side in (-1, 1):
        ex, ey = cx + side * s * 0.38, cy - s * 0.12
        if cat:
            ell(img, ex, ey, s * 0.17, s * 0.1, side * 10, (60, 200, 120))
            ell(img, ex, ey, s * 0.03, s * 0.09, 0, (10, 10, 10))
        else:
            ell(img, ex, ey, s * 0.11, s * 0.11, 0, (250, 250, 250))
            ell(img, ex, ey, s * 0.07, s * 0.07, 0, (20, 40, 70))
    if cat:
        ell(img, cx, cy + s * 0.22, s * 0.08, s * 0.06, 0, (150, 120, 240))
        for side in (-1, 1):  # whiskers
            for k in (-1, 0, 1):
                p0 = pt(cx + side * s * 0.15, cy + s * 0.3)
                p1 = pt(cx + side * s * 1.15, cy + s * (0.3 + 0.15 * k))
                cv2.line(img, p0, p1, (235, 235, 235), max(1, int(s / 60)), cv2.LINE_AA)
    else:
        ell(img, cx, cy + s * 0.45, s * 0.2, s * 0.14, 0, (15, 15, 15))
        if rng.uniform() < 0.5:  # tongue
            ell(img, cx, cy + s * 0.85, s * 0.12, s * 0.16, 0, (120, 100, 230))
    return img


def draw_pretext(label: int, index: int, seed: int = 0, size: int = 227) -> np.ndarray:
    """One image of pretext class ``label`` (see :data:`PRETEXT_CLASSES`), ``size`` x ``size`` BGR."""
    import cv2

    rng = _rng(seed, f"pretext{label}", index)
    img = _background(rng, size, size)
    col = tuple(int(v) for v in rng.integers(0, 256, 3))
    c = (int(size / 2 + rng.uniform(-0.15, 0.15) * size), int(size / 2 + rng.uniform(-0.15, 0.15) * size))
    r = int(size * rng.uniform(0.2, 0.35))
    name = PRETEXT_CLASSES[label % len(PRETEXT_CLASSES)]
    yy, xx = np.mgrid[0:size, 0:size]
    if name == "disc":
        cv2.circle(img, c, r, col, -1, cv2.LINE_AA)
    elif name == "square":
        box = cv2.boxPoints(((c[0], c[1]), (2 * r, 2 * r), float(rng.uniform(0, 90)))).astype(np.int32)
        cv2.fillConvexPoly(img, box, col, cv2.LINE_AA)
    elif name == "triangle":
        a0 = rng.uniform(0, 2 * math.pi)
        pts = [(c[0] + r * math.cos(a0 + k * 2 * math.pi / 3), c[1] + r * math.sin(a0 + k * 2 * math.pi / 3))
               for k in range(3)]
        cv2.fillConvexPoly(img, np.array(pts, np.int32), col, cv2.LINE_AA)
    elif name == "cross":
        t = max(4, r // 3)
        cv2.line(img, (c[0] - r, c[1]), (c[0] + r, c[1]), col, t, cv2.LINE_AA)
        cv2.line(img, (c[0], c[1] - r), (c[0], c[1] + r), col, t, cv2.LINE_AA)
    else:
        period = rng.uniform(10, 24)
        if name == "horizontal bars":
            m = np.sin((yy + rng.uniform(0, 50)) * 2 * math.pi / period) > 0
        elif name == "checkerboard":
            m = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
        elif name == "rings":
            m = np.sin(np.hypot(xx - c[0], yy - c[1]) * 2 * math.pi / period) > 0
        else:  # grid
            m = ((xx % period) < 3) | ((yy % period) < 3)
        region = np.hypot(xx - c[0], yy - c[1]) < r * 1.6
        img[m & region] = col
    return img


@dataclass
class PetImageSet:
    """Where :func:`write_pet_images` put the images and what they are."""

    train_dir: Path
    test_dir: Path
    test_labels: Path
    n_train: int
    n_test: int


def _imwrite(path: Path, img: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, buf.tobytes())


def write_pet_images(out_dir: str | os.PathLike[str], n_per_class: int = 120, n_test: int = 40, seed: int = 0,
                     size: tuple[int, int] | None = None) -> PetImageSet:
    """Write ``out_dir/train/{cat,dog}.<n>.jpg`` (``n_per_class`` each), ``out_dir/test1/<n>.jpg``
    (``n_test``, alternating cat/dog in a seeded order) and ``out_dir/test1_labels.csv`` (``id,label``
    with 0 = cat, 1 = dog: the answers Kaggle keeps to itself). Existing files are overwritten."""
    out = Path(out_dir)
    train, test = out / "train", out / "test1"
    train.mkdir(parents=True, exist_ok=True)
    test.mkdir(parents=True, exist_ok=True)
    for kind in ("cat", "dog"):
        for i in range(n_per_class):
            _imwrite(train / f"{kind}.{i}.jpg", draw_pet(kind, i, seed, size))
    order = np.random.default_rng([int(seed), 7]).permutation(n_test)
    rows = ["id,label"]
    for n in range(1, n_test + 1):
        label = int(order[n - 1] % 2)
        # test images use indices the training set never uses
        _imwrite(test / f"{n}.jpg", draw_pet("cat" if label == 0 else "dog", 100000 + n, seed, size))
        rows.append(f"{n},{label}")
    labels = out / "test1_labels.csv"
    atomic_write(labels, ("\n".join(rows) + "\n").encode())
    return PetImageSet(train, test, labels, 2 * n_per_class, n_test)


# --------------------------------------------------------------------------------------------------
# The stand-in for bvlc_reference_caffenet.caffemodel


def write_pretext_lmdb(path: str | os.PathLike[str], n_per_class: int = 24, seed: int = 0,
                       size: int = 227) -> int:
    """An LMDB of the pretext classes (labels 0..7, raw BGR Datums, keys ``%05d``) after the same
    histogram equalisation as the cat/dog images. Returns the record count."""
    from caffeport.io.lmdb_store import LMDBWriter, array_to_datum
    from caffeport.tools.cats_dogs import transform_img

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = [(label, i) for i in range(n_per_class) for label in range(len(PRETEXT_CLASSES))]
    with LMDBWriter(path) as w:
        for k, (label, i) in enumerate(order):
            img = transform_img(draw_pretext(label, i, seed, size), size, size)
            w.put(f"{k:05d}", array_to_datum(np.ascontiguousarray(img.transpose(2, 0, 1)), label).SerializeToString())
    return len(order)


def conv1_filter_bank(n: int = 96, k: int = 11, channels: int = 3) -> np.ndarray:
    """A deterministic (n, channels, k, k) float32 bank like the conv1 filters ImageNet training
    produces: luminance Gabor edges/bars at 8 orientations and 3 wavelengths (2 phases), then
    colour-opponent Gabors and centre-surround colour blobs; each filter has zero mean and unit norm."""
    yy, xx = np.mgrid[0:k, 0:k].astype(np.float64) - (k - 1) / 2.0
    filters: list[np.ndarray] = []

    def gabor(theta: float, lam: float, phase: float, sigma: float) -> np.ndarray:
        xr = xx * math.cos(theta) + yy * math.sin(theta)
        yr = -xx * math.sin(theta) + yy * math.cos(theta)
        return np.exp(-(xr ** 2 + yr ** 2) / (2 * sigma ** 2)) * np.cos(2 * math.pi * xr / lam + phase)

    thetas = [i * math.pi / 8 for i in range(8)]
    for lam, sigma in ((3.5, 1.8), (6.0, 2.6), (10.0, 3.4)):
        for phase in (0.0, math.pi / 2):
            for t in thetas:
                g = gabor(t, lam, phase, sigma)
                filters.append(np.stack([g] * channels))
    opponents = [(1.0, -0.5, -0.5), (-0.5, 1.0, -0.5), (-0.5, -0.5, 1.0)]  # B, G, R against the rest
    for col in opponents:
        for t in thetas:
            g = gabor(t, 8.0, 0.0, 3.0)
            filters.append(np.stack([g * c for c in col[:channels]]))
    blob = np.exp(-(xx ** 2 + yy ** 2) / (2 * 1.5 ** 2)) - 0.5 * np.exp(-(xx ** 2 + yy ** 2) / (2 * 3.5 ** 2))
    wide = np.exp(-(xx ** 2 + yy ** 2) / (2 * 3.0 ** 2))
    extra = [np.stack([blob * c for c in col[:channels]]) for col in opponents]
    extra += [np.stack([-blob * c for c in col[:channels]]) for col in opponents]
    extra += [np.stack([wide * c for c in col[:channels]]) for col in opponents]
    extra += [np.stack([blob] * channels), np.stack([-blob] * channels)]
    filters += extra
    while len(filters) < n:  # repeat at other phases if more are asked for
        i = len(filters)
        filters.append(np.stack([gabor(thetas[i % 8], 5.0, math.pi / 4 * (i % 4), 2.2)] * channels))
    bank = np.stack(filters[:n])
    bank -= bank.mean(axis=(1, 2, 3), keepdims=True)
    bank /= np.linalg.norm(bank.reshape(n, -1), axis=1).reshape(n, 1, 1, 1) + 1e-12
    return bank.astype(np.float32)


# Output standard deviations the stand-in's layers are scaled to: unit variance inside the conv stack,
# then small enough pool5/fc6/fc7 activations that the tutorial's base_lr 0.001 is stable (features
# that are large and dense in 9216 dimensions make SGD overshoot).
STANDIN_TARGET_STD = {"conv1": 1.0, "conv2": 1.0, "conv3": 1.0, "conv4": 1.0, "conv5": 0.2, "fc6": 0.3, "fc7": 0.3}


def _calibrate(net: object, batch: dict[str, np.ndarray], targets: dict[str, float]) -> None:
    """Layer-sequential scaling: for each layer in order, scale its weights so that its output on
    ``batch`` has the standard deviation ``targets[layer]``, and zero its bias."""
    for name, target in targets.items():
        params = net.params[name]  # type: ignore[attr-defined]
        if len(params) > 1:
            params[1].data[...] = 0
        out = net.forward(end=name, **batch)  # type: ignore[attr-defined]
        std = float(np.std(out[net.top_names[name][0]]))  # type: ignore[attr-defined]
        if std > 0 and math.isfinite(std):
            params[0].data[...] *= np.float32(target / std)


@dataclass
class StandinInfo:
    """The stand-in weights file and what went into it."""

    path: Path
    pretext_records: int
    iterations: int
    first_loss: float | None
    last_loss: float | None
    seconds: float


def make_standin_caffemodel(folder: str | os.PathLike[str], out: str | os.PathLike[str], iterations: int | None = None,
                            n_per_class: int = 24, seed: int = 0, echo: bool = True) -> StandinInfo:
    """Write a CaffeNet caffemodel shaped and named like ``bvlc_reference_caffenet.caffemodel``.

    ``folder`` holds ``caffenet_standin_train.prototxt`` and ``solver_standin.prototxt`` (the demo's
    copy of ``samples/cats_dogs``); the pretext LMDB goes to ``folder/input/pretext_lmdb``.
    """
    import torch

    from caffeport.tools.logs import parse_log

    t0 = time.time()
    folder = Path(folder)
    n = write_pretext_lmdb(folder / "input" / "pretext_lmdb", n_per_class, seed)
    torch.manual_seed(seed)

    def init(solver: object) -> None:
        net = solver.net  # type: ignore[attr-defined]
        w = net.params["conv1"][0]
        w.data[...] = conv1_filter_bank(w.shape[0], w.shape[2], w.shape[1]) if w.shape[2] == w.shape[3] else w.data
        net.forward(end="data")
        batch = {"data": net.blobs["data"].data.copy(), "label": net.blobs["label"].data.copy()}
        _calibrate(net, batch, {k: v for k, v in STANDIN_TARGET_STD.items() if k in net.params})

    log_path = folder / "standin_train.log"
    solver = train_with_solver(folder / "solver_standin.prototxt", log_path=log_path, iterations=iterations,
                               before=init, echo=echo)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    solver.net.save(out)  # type: ignore[attr-defined]
    losses = parse_log(log_path).column("train", "loss")
    return StandinInfo(out, n, int(solver.iter), losses[0] if losses else None,  # type: ignore[attr-defined]
                       losses[-1] if losses else None, time.time() - t0)


# --------------------------------------------------------------------------------------------------
# Training through the solver library (what `caffeport train` runs)


def train_with_solver(solver: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None,
                      log_path: str | os.PathLike[str] | None = None, iterations: int | None = None,
                      snapshot_prefix: str | os.PathLike[str] | None = None,
                      before: Callable[[object], None] | None = None, echo: bool = True) -> object:
    """Run ``caffeport train --solver S [--weights W] [--iterations N] [--snapshot_prefix P] --log L``
    through the same library call as the CLI. ``log_path`` is truncated first and receives the glog
    lines (also echoed on stderr with ``echo``); ``before(solver)`` runs after the weights are copied
    and before the first iteration. Returns the solver (``solver.net`` holds the trained weights)."""
    from caffeport.solver import Glog
    from caffeport.solver.parallel import TrainJob, train

    streams: list = [sys.stderr] if echo else []
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        streams.append(open(log_path, "w", encoding="utf-8"))  # noqa: SIM115 - closed by log.close()
    log = Glog(streams, progress=echo)
    job = TrainJob(os.fspath(solver), weights=os.fspath(weights) if weights else None, iterations=iterations,
                   snapshot_prefix=os.fspath(snapshot_prefix) if snapshot_prefix else None,
                   log_file=os.fspath(log_path) if log_path else None)
    try:
        return train(job, None, log, after_load=before)
    finally:
        log.close()


# --------------------------------------------------------------------------------------------------
# The demo


def samples_dir() -> Path:
    """``samples/cats_dogs`` of the source tree this package runs from."""
    d = Path(__file__).resolve().parents[1] / "samples" / "cats_dogs"
    if not (d / "solver_demo.prototxt").exists():
        raise CaffeportError(f"the recipe's prototxts are not at '{d}': run the demo from a caffeport source "
                             "checkout (git clone ...; make demo)")
    return d


@dataclass
class DemoReport:
    """What the demo produced and measured."""

    out_dir: Path
    artefacts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    validation_accuracy: float | None = None
    validation_accuracy_start: float | None = None
    heldout_accuracy: float | None = None
    frozen_unchanged: dict[str, bool] = field(default_factory=dict)
    fresh_layer_ok: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The tutorial's promises: well above chance, frozen layers untouched, fc8-cats-dogs fresh."""
        return (self.validation_accuracy is not None and self.validation_accuracy >= 0.7
                and bool(self.frozen_unchanged) and all(self.frozen_unchanged.values()) and self.fresh_layer_ok)


def _run_cli(args: Sequence[str]) -> tuple[bool, str]:
    """Run a ``caffeport`` subcommand in-process; (success, what it printed or the error)."""
    import contextlib
    import io

    from caffeport.cli import main as cli

    if args[0] not in cli.commands:
        return False, f"`caffeport {args[0]}` is not available in this build"
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(args=list(args), prog_name="caffeport", standalone_mode=False)
        return True, out.getvalue().strip()
    except SystemExit as e:
        return e.code in (0, None), (err.getvalue() or out.getvalue()).strip()
    except Exception as e:  # the demo reports a failing optional step and goes on
        return False, f"{type(e).__name__}: {e}"


def _step(report: DemoReport, name: str, say: Callable[[str], None]) -> Callable[[], None]:
    t0 = time.time()
    say(f"\n== {name}")

    def done() -> None:
        report.timings[name] = time.time() - t0
    return done


def run_demo(out_dir: str | os.PathLike[str] = "demo_out", n_per_class: int = 120, n_test: int = 40,
             standin_iterations: int | None = None, iterations: int | None = None, seed: int = 0,
             echo: bool = True, say: Callable[[str], None] = print) -> DemoReport:
    """The whole recipe (see the module docstring) into ``out_dir``; returns a :class:`DemoReport`."""
    from caffeport.io import load_caffemodel
    from caffeport.tools.cats_dogs import create_lmdb
    from caffeport.tools.logs import parse_log, plot_log, write_parse_log_csv
    from caffeport.tools.mean import compute_image_mean
    from caffeport.tools.predict import predict_images, write_submission

    t_start = time.time()
    out = Path(out_dir).resolve()
    report = DemoReport(out)
    art = report.artefacts
    out.mkdir(parents=True, exist_ok=True)
    for f in samples_dir().glob("*.prototxt"):  # the recipe's files, next to their data as in the tutorial
        shutil.copyfile(f, out / f.name)
    art["prototxts"] = out
    inp = out / "input"
    for old in ("train_lmdb", "validation_lmdb", "pretext_lmdb"):
        if (inp / old).exists():
            shutil.rmtree(inp / old)

    done = _step(report, "1. image set (synthetic Kaggle-style cats and dogs)", say)
    pets = write_pet_images(inp, n_per_class, n_test, seed)
    art["train images"], art["test1 images"] = pets.train_dir, pets.test_dir
    say(f"{pets.n_train} training images in {pets.train_dir}, {pets.n_test} held-out in {pets.test_dir}")
    done()

    done = _step(report, "2. create-lmdb (equalizeHist, 227x227 INTER_CUBIC, 5/6 train, 1/6 validation)", say)
    lm = create_lmdb(pets.train_dir, inp, seed=seed, overwrite=True, show_progress=False)
    art["train_lmdb"], art["validation_lmdb"] = lm.train_lmdb, lm.validation_lmdb
    say(f"{lm.n_train} records in {lm.train_lmdb}, {lm.n_validation} in {lm.validation_lmdb}")
    done()

    done = _step(report, "3. compute-image-mean", say)
    mean_path = inp / "mean.binaryproto"
    mean = compute_image_mean(lm.train_lmdb, mean_path)
    art["mean"] = mean_path
    say(f"{mean_path}: shape {mean.shape}, channel means (B,G,R) {[round(float(v), 1) for v in mean.mean((1, 2))]}")
    done()

    done = _step(report, "4. stand-in for bvlc_reference_caffenet.caffemodel", say)
    standin = out / "bvlc_reference_caffenet.caffemodel"
    info = make_standin_caffemodel(out, standin, standin_iterations, seed=seed, echo=False)
    art["pretrained weights (stand-in)"] = standin
    art["stand-in pre-training log"] = out / "standin_train.log"
    say(f"{standin}: CaffeNet (conv1..fc8, 1000 outputs), pre-trained {info.iterations} iterations on "
        f"{info.pretext_records} synthetic non-pet images")
    done()

    done = _step(report, "5. fine-tune: caffeport train --solver solver_demo.prototxt "
                 "--weights bvlc_reference_caffenet.caffemodel", say)
    log_path = out / "model_demo_train.log"
    pre = load_caffemodel(standin)
    fresh: dict[str, object] = {}

    def record_start(solver: object) -> None:
        w = solver.net.params["fc8-cats-dogs"]  # type: ignore[attr-defined]
        fresh["w"], fresh["b"] = w[0].data.copy(), w[1].data.copy()

    solver = train_with_solver(out / "solver_demo.prototxt", standin, log_path, iterations,
                               snapshot_prefix=out / "caffe_model_demo", before=record_start, echo=echo)
    snaps = sorted(out.glob("caffe_model_demo_iter_*.caffemodel"), key=lambda p: p.stat().st_mtime)
    final = out / f"caffe_model_demo_iter_{solver.iter}.caffemodel"  # type: ignore[attr-defined]
    if not final.exists() and snaps:
        final = snaps[-1]
    art["training log"], art["fine-tuned weights"] = log_path, final
    trained = load_caffemodel(final)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        report.frozen_unchanged[name] = all(a.tobytes() == b.tobytes() for a, b in zip(pre[name], trained[name]))
    w0 = np.asarray(fresh.get("w", np.zeros(1)))
    report.fresh_layer_ok = ("fc8-cats-dogs" not in pre and w0.shape == (2, 4096)
                             and 0.005 < float(w0.std()) < 0.02 and not np.any(np.asarray(fresh.get("b", 1))))
    done()

    done = _step(report, "6. plot-log and parse-log", say)
    parsed = parse_log(log_path)
    curve = out / "caffe_model_demo_learning_curve.png"
    plot_log(log_path, curve, parsed=parsed)
    art["learning curve"] = curve
    for f in write_parse_log_csv(log_path, out, parsed=parsed):
        art[f"log table {f.suffix}"] = f
    accs = parsed.column("test", "accuracy")
    if accs:
        report.validation_accuracy_start, report.validation_accuracy = accs[0], accs[-1]
    done()

    done = _step(report, "7. predict the held-out test1/ images (Kaggle submission)", say)
    preds = predict_images(out / "caffenet_deploy_2.prototxt", final, [pets.test_dir], mean_path, show_progress=False)
    sub = write_submission(preds, out / "submission_model_demo.csv")
    art["submission"] = sub
    truth = dict(line.split(",") for line in pets.test_labels.read_text().splitlines()[1:])
    hits = [p.label == int(truth[p.id]) for p in preds if p.id in truth]
    report.heldout_accuracy = float(np.mean(hits)) if hits else None
    done()

    done = _step(report, "8. draw the net and export ONNX", say)
    for target in ("caffe_model_demo.dot", "caffe_model_demo.png"):
        ok, msg = _run_cli(["draw", str(out / "caffenet_train_val_demo.prototxt"), str(out / target), "--display-lrm"])
        if ok:
            art[f"net drawing ({target.rsplit('.', 1)[1]})"] = out / target
        else:
            report.notes.append(f"draw {target}: {msg}")
    onnx_path = out / "caffe_model_demo.onnx"
    ok, msg = _run_cli(["export-onnx", str(out / "caffenet_deploy_2.prototxt"), "--weights", str(final),
                        "--output", str(onnx_path)])
    if ok:
        art["ONNX model"] = onnx_path
    else:
        report.notes.append(f"export-onnx: {msg}")
    done()
    report.timings["total"] = time.time() - t_start
    return report


def _print_report(r: DemoReport, say: Callable[[str], None] = print) -> None:
    say("\n== Artefacts")
    for k, v in r.artefacts.items():
        try:
            shown = v.relative_to(Path.cwd())
        except ValueError:
            shown = v
        say(f"  {k:32s} {shown}")
    for n in r.notes:
        say(f"  note: {n}")
    say("\n== Results")
    if r.validation_accuracy is not None:
        say(f"  validation accuracy: {r.validation_accuracy:.3f} (at iteration 0: "
            f"{r.validation_accuracy_start:.3f}; chance: 0.5)")
    if r.heldout_accuracy is not None:
        say(f"  held-out test1 accuracy (arg-max of the submission's probabilities): {r.heldout_accuracy:.3f}")
    frozen = ", ".join(f"{k} {'unchanged' if v else 'CHANGED'}" for k, v in r.frozen_unchanged.items())
    say(f"  frozen layers (lr_mult 0) vs the pre-trained file, byte for byte: {frozen}")
    fresh = "absent from the weights file, started from its fillers" if r.fresh_layer_ok else "NOT fresh"
    say(f"  fc8-cats-dogs: {fresh}")
    parts = ", ".join(f"step {k.split('.')[0]} {v:.0f}s" for k, v in r.timings.items() if k != "total")
    say(f"  wall time: {r.timings.get('total', 0.0):.0f} s ({parts})")
    say("  " + ("OK: the recipe learned, as the tutorial promises." if r.ok else "FAILED: see above."))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m caffeport.demo [--out demo_out] [--iterations N] [--quiet]``."""
    ap = argparse.ArgumentParser(prog="python -m caffeport.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    ap.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations (default: the solver's)")
    ap.add_argument("--standin-iterations", type=int, default=None,
                    help="pre-training iterations of the stand-in (default: solver_standin.prototxt's)")
    ap.add_argument("--per-class", type=int, default=120, help="training images per class (default 120)")
    ap.add_argument("--test-images", type=int, default=40, help="held-out test1 images (default 40)")
    ap.add_argument("--quiet", action="store_true", help="do not echo the solver's log lines")
    a = ap.parse_args(argv)
    try:
        r = run_demo(a.out, a.per_class, a.test_images, a.standin_iterations, a.iterations, echo=not a.quiet)
    except CaffeportError as e:
        print(f"caffeport demo: error: {e}", file=sys.stderr)
        return 1
    _print_report(r)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
