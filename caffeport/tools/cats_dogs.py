"""The cats-vs-dogs tutorial's data preparation (``code/create_lmdb.py``), as a library and a command.

What the tutorial's script does, and what this module reproduces:

- every training image is read with OpenCV (``cv2.IMREAD_COLOR``: 3 channels, **BGR**), each channel
  is histogram-equalised on its own (``cv2.equalizeHist``) and the image is resized to 227x227 with
  ``cv2.INTER_CUBIC`` (:func:`transform_img`);
- the label comes from the file name, Kaggle style: ``cat.123.jpg`` -> 0, ``dog.45.jpg`` -> 1;
- the (shuffled) list is split by position: ``in_idx % 6 == 0`` goes to ``validation_lmdb``, the
  other 5/6 to ``train_lmdb``;
- each image is stored as a raw ``Datum`` (uint8, C,H,W = ``np.rollaxis(img, 2)``, channels 3) under
  the key ``'{:0>5d}'.format(in_idx)``, so the Data layer reads them in list order;
- an optional unlabelled ``test1/`` folder becomes ``test_lmdb`` (label 0), keys from its own index.

Deliberate differences from the script, all documented in the command's help:

- the label is decided from the file's *base name*; the script tested ``'cat' in img_path`` on the
  whole path, which labels every image "cat" once a folder name contains "cat" (``cats_dogs/``);
  names that start with neither ``cat`` nor ``dog`` are an error rather than silently "dog";
- the shuffle is seeded (``seed``, default 0) so a rerun writes the same databases; ``seed=None``
  keeps the sorted file order;
- the databases are built next to their final path and renamed into place (never half-written), and
  an existing output is only replaced when ``overwrite`` is set (the script ran ``rm -rf`` first).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caffeport.errors import CaffeportError

__all__ = [
    "IMAGE_WIDTH",
    "IMAGE_HEIGHT",
    "IMAGE_EXTENSIONS",
    "transform_img",
    "read_image",
    "label_from_name",
    "list_images",
    "split_train_validation",
    "write_image_lmdb",
    "create_lmdb",
    "CreateLmdbResult",
    "progress",
]

IMAGE_WIDTH = 227
IMAGE_HEIGHT = 227
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
LABELS = {"cat": 0, "dog": 1}


def transform_img(img: np.ndarray, img_width: int = IMAGE_WIDTH, img_height: int = IMAGE_HEIGHT) -> np.ndarray:
    """The tutorial's ``transform_img``: per-channel histogram equalisation, then an INTER_CUBIC resize.

    ``img`` is an H,W,3 uint8 BGR image (as ``cv2.imread`` returns); the result is
    ``img_height`` x ``img_width`` x 3 uint8. The input array is not modified (the script equalised
    in place; the values are the same).
    """
    import cv2

    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise CaffeportError(f"transform_img needs an H,W,3 uint8 image, got shape {a.shape} dtype {a.dtype}")
    out = np.empty_like(a)
    for c in range(3):
        out[:, :, c] = cv2.equalizeHist(np.ascontiguousarray(a[:, :, c]))
    return cv2.resize(out, (int(img_width), int(img_height)), interpolation=cv2.INTER_CUBIC)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """``cv2.imread(path, cv2.IMREAD_COLOR)`` (H,W,3 uint8 BGR), with a clear error when unreadable."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise CaffeportError(f"cannot read image '{path}' (missing, or not an image OpenCV can decode)")
    return img


def label_from_name(path: str | os.PathLike[str]) -> int:
    """Kaggle's naming: ``cat.<n>.jpg`` -> 0, ``dog.<n>.jpg`` -> 1 (decided on the base name only)."""
    name = Path(path).name.lower()
    for prefix, label in LABELS.items():
        if name.startswith(prefix):
            return label
    raise CaffeportError(
        f"cannot tell the label of '{path}': training images must be named like Kaggle's "
        "'cat.<n>.jpg' (label 0) or 'dog.<n>.jpg' (label 1)"
    )


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files of ``folder`` (not recursive), sorted by name."""
    d = Path(folder)
    if not d.is_dir():
        raise CaffeportError(f"image folder '{d}' does not exist")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def split_train_validation(paths: Sequence[Path]) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """The tutorial's split by position: ``in_idx % 6 == 0`` -> validation, else train.

    Returns ``(train, validation)`` as lists of ``(in_idx, path)``; ``in_idx`` is also the LMDB key.
    """
    train: list[tuple[int, Path]] = []
    val: list[tuple[int, Path]] = []
    for idx, p in enumerate(paths):
        (val if idx % 6 == 0 else train).append((idx, p))
    return train, val


def progress(items: Sequence, desc: str, enabled: bool | None = None) -> Iterable:
    """Yield ``items`` while drawing a one-line progress bar on stderr when it is a terminal."""
    show = sys.stderr.isatty() if enabled is None else enabled
    n = len(items)
    if not show or n == 0:
        yield from items
        return
    width = 30
    for i, item in enumerate(items, 1):
        yield item
        done = int(width * i / n)
        sys.stderr.write(f"\r{desc} [{'#' * done}{'.' * (width - done)}] {i}/{n}")
        sys.stderr.flush()
    sys.stderr.write("\n")


def write_image_lmdb(
    out: str | os.PathLike[str],
    records: Sequence[tuple[int, Path]],
    label_of: Callable[[Path], int],
    img_width: int = IMAGE_WIDTH,
    img_height: int = IMAGE_HEIGHT,
    overwrite: bool = False,
    show_progress: bool | None = None,
    desc: str = "",
) -> int:
    """Write ``records`` (``(in_idx, path)``) as raw Datums under keys ``'{:0>5d}'.format(in_idx)``.

    The database is built in a temporary folder and renamed to ``out`` when complete. Returns the
    number of records written.
    """
    from caffeport.io.lmdb_store import LMDBWriter, array_to_datum

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise CaffeportError(f"output database '{out}' already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.with_name(f".{out.name}.building-{os.getpid()}")
    if build.exists():
        shutil.rmtree(build)
    with LMDBWriter(build, commit_every=1000, atomic=False) as w:
        for idx, path in progress(records, desc or out.name, show_progress):
            img = transform_img(read_image(path), img_width, img_height)
            datum = array_to_datum(np.ascontiguousarray(np.rollaxis(img, 2)), label_of(path))
            w.put(f"{idx:0>5d}", datum.SerializeToString())
        count = w.count
    if out.exists():
        shutil.rmtree(out)
    os.replace(build, out)
    return count


@dataclass
class CreateLmdbResult:
    """What :func:`create_lmdb` wrote: paths and record counts."""

    train_lmdb: Path
    validation_lmdb: Path
    n_train: int
    n_validation: int
    test_lmdb: Path | None = None
    n_test: int = 0
    order: list[Path] = field(default_factory=list)


def create_lmdb(
    train_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    test_dir: str | os.PathLike[str] | None = None,
    img_width: int = IMAGE_WIDTH,
    img_height: int = IMAGE_HEIGHT,
    seed: int | None = 0,
    overwrite: bool = False,
    show_progress: bool | None = None,
) -> CreateLmdbResult:
    """The tutorial's ``create_lmdb.py``: ``train_dir`` -> ``out_dir/train_lmdb`` + ``validation_lmdb``
    (and ``test_dir`` -> ``out_dir/test_lmdb`` with label 0).

    The training files are sorted, then shuffled with ``random.Random(seed)`` (the script used an
    unseeded ``random.shuffle``); ``seed=None`` keeps them sorted.
    """
    paths = list_images(train_dir)
    if not paths:
        raise CaffeportError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{train_dir}'")
    for p in paths:  # fail before writing anything
        label_from_name(p)
    if seed is not None:
        random.Random(seed).shuffle(paths)
    train, val = split_train_validation(paths)
    out = Path(out_dir)
    res = CreateLmdbResult(out / "train_lmdb", out / "validation_lmdb", 0, 0, order=list(paths))
    res.n_train = write_image_lmdb(res.train_lmdb, train, label_from_name, img_width, img_height, overwrite,
                                   show_progress, "train_lmdb")
    res.n_validation = write_image_lmdb(res.validation_lmdb, val, label_from_name, img_width, img_height,
                                        overwrite, show_progress, "validation_lmdb")
    if test_dir is not None:
        tpaths = list_images(test_dir)
        res.test_lmdb = out / "test_lmdb"
        res.n_test = write_image_lmdb(res.test_lmdb, list(enumerate(tpaths)), lambda _p: 0, img_width,
                                      img_height, overwrite, show_progress, "test_lmdb")
    return res
