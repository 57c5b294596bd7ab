"""The tutorial's ``make_predictions_{1,2}.py``: classify images with a deploy net and write a Kaggle CSV.

For each image, exactly as the tutorial: ``cv2.imread`` (BGR) -> per-channel histogram equalisation
and INTER_CUBIC resize to the net's input size (:func:`caffeport.tools.cats_dogs.transform_img`) ->
``float32``, H,W,C -> C,H,W (pycaffe's ``set_transpose('data', (2, 0, 1))``) -> minus the mean image
read from ``mean.binaryproto`` (``set_mean``) -> the deploy net's ``prob`` output.

The tutorial's submission wrote the arg-max class; Kaggle's "Dogs vs. Cats Redux" scores the
*probability* of dog, so ``label`` here is ``prob[1]`` (``--argmax`` writes the class as the script
did). ``id`` is the file name without its extension (``test1/123.jpg`` -> ``123``); rows are sorted
by numeric id when every id is a number.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.tools.cats_dogs import progress, read_image, transform_img
from caffeport.tools.logs import atomic_write_bytes

__all__ = ["Prediction", "read_mean_image", "preprocess", "predict_images", "write_submission", "image_id"]


@dataclass
class Prediction:
    """One image's result: its Kaggle id, file, and class probabilities."""

    id: str
    path: Path
    probs: np.ndarray

    @property
    def label(self) -> int:
        return int(np.argmax(self.probs))


def read_mean_image(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``mean.binaryproto`` as a (C,H,W) float32 array (the tutorial reshapes the legacy
    ``channels/height/width``; blobs written with ``shape`` are accepted too)."""
    from caffeport.io import read_blobproto

    arr = read_blobproto(path)
    if arr.ndim != 3:
        raise CaffeportError(f"mean file '{path}': expected a (1,)C,H,W mean image, got shape {arr.shape}")
    return arr


def preprocess(img_bgr: np.ndarray, mean: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """One image as the tutorial feeds it: transform_img, float32, C,H,W, minus the mean image."""
    img = transform_img(img_bgr, width, height)
    x = img.astype(np.float32).transpose(2, 0, 1)
    if mean is not None:
        if mean.shape != x.shape:
            raise CaffeportError(f"the mean image has shape {mean.shape}, the net input needs {x.shape}")
        x = x - mean
    return x


def image_id(path: str | os.PathLike[str]) -> str:
    """Kaggle's id: the file name without its extension."""
    return Path(path).stem


def _sort_key(p: Path) -> tuple[int, int | str]:
    s = p.stem
    return (0, int(s)) if s.isdigit() else (1, s)


def predict_images(
    model: str | os.PathLike[str],
    weights: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    mean_file: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    prob_blob: str = "prob",
    show_progress: bool | None = None,
    fast: bool = False,
) -> list[Prediction]:
    """Run ``model`` (a deploy prototxt with one ``Input``) with ``weights`` on ``images``.

    ``images`` may name files or folders (every image in a folder). Returns one :class:`Prediction`
    per image, sorted by id. ``fast=True`` runs the checked fast module (``caffeport.fast``).
    """
    from caffeport.net import TEST, Net
    from caffeport.tools.cats_dogs import list_images

    paths: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            paths.extend(list_images(p))
        elif p.exists():
            paths.append(p)
        else:
            raise CaffeportError(f"image '{p}' does not exist")
    if not paths:
        raise CaffeportError("no images to predict")
    paths.sort(key=_sort_key)
    net = Net(model, weights, TEST, fast=fast)
    if not net.inputs:
        raise CaffeportError(f"{model}: the deploy net has no Input layer to feed the images to")
    data = net.inputs[0]
    shape = net.blobs[data].shape
    if len(shape) != 4 or shape[1] != 3:
        raise CaffeportError(f"{model}: input '{data}' has shape {shape}; predict needs N,3,H,W")
    height, width = int(shape[2]), int(shape[3])
    if fast and prob_blob not in net.outputs:
        raise CaffeportError(f"{model}: --fast reads net outputs only; '{prob_blob}' is not one "
                             f"(outputs: {', '.join(net.outputs)})")
    if prob_blob not in net.blobs:
        raise CaffeportError(f"{model}: no blob named '{prob_blob}' (outputs: {', '.join(net.outputs)})")
    mean = read_mean_image(mean_file) if mean_file else None
    out: list[Prediction] = []
    batches = [paths[i:i + max(1, batch_size)] for i in range(0, len(paths), max(1, batch_size))]
    for batch in progress(batches, "predict", show_progress):
        x = np.stack([preprocess(read_image(p), mean, width, height) for p in batch])
        probs = net.forward(**{data: x}, blobs=None if fast else [prob_blob])[prob_blob]
        probs = np.asarray(probs, dtype=np.float64).reshape(len(batch), -1)
        out.extend(Prediction(image_id(p), p, probs[i].copy()) for i, p in enumerate(batch))
    return out


def write_submission(preds: Sequence[Prediction], out: str | os.PathLike[str], column: int = 1,
                     argmax: bool = False) -> Path:
    """Write Kaggle's ``id,label`` CSV (label = probability of class ``column``, dog by default; the
    arg-max class with ``argmax``), atomically."""
    lines = ["id,label"]
    for p in preds:
        if argmax:
            lines.append(f"{p.id},{p.label}")
        else:
            if column >= p.probs.size:
                raise CaffeportError(f"class {column} is out of range: the net gives {p.probs.size} probabilities")
            lines.append(f"{p.id},{float(p.probs[column]):.6f}")
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return Path(out)
