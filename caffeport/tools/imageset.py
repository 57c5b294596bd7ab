"""``convert_imageset``: an image list file → a database of ``Datum`` records, exactly as Caffe's tool.

For every line "<file> <label>" of the list (split at the last space, label via ``atoi``):

- the image ``root_folder + file`` is read with OpenCV (BGR colour, or grayscale with ``gray``) and,
  when both ``resize_height`` and ``resize_width`` are > 0, resized with INTER_LINEAR;
- raw mode stores uint8 C,H,W pixels (``channels/height/width`` set, ``encoded: false``);
- ``encoded`` mode stores the file's own bytes when no resize is asked and the file's extension
  matches the encoding (``encode_type``, or guessed from the extension), else the image re-encoded
  with ``cv2.imencode`` (``channels/height/width`` stay 0, ``encoded: true``);
- the key is ``%08d_<file>`` where the number is the line's index (unreadable images are skipped
  with a warning but still use up their index, as in Caffe);
- records are committed every 1000.

``shuffle`` permutes the lines first (numpy RNG, not Caffe's, so the order differs from Caffe's for
the same list). The output is built in ``<db>.tmp-<pid>`` and renamed when complete.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from caffeport.data.sources import read_image, read_image_list
from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import array_to_datum, open_writer
from caffeport.proto import caffe_pb2

__all__ = ["convert_imageset", "image_to_datum"]


def _match_ext(filename: str, encoding: str) -> bool:
    p = filename.rfind(".")
    ext = (filename[p + 1 :] if p >= 0 else filename).lower()
    en = encoding.lower()
    return ext == en or (en == "jpg" and ext == "jpeg")


def image_to_datum(
    path: str | os.PathLike[str],
    label: int,
    resize_height: int = 0,
    resize_width: int = 0,
    is_color: bool = True,
    encoding: str = "",
) -> caffe_pb2.Datum | None:
    """Caffe's ``ReadImageToDatum``: one image file → a Datum (None when OpenCV cannot read it)."""
    import cv2

    img = read_image(path, resize_height, resize_width, is_color)
    if img is None:
        return None
    if encoding:
        d = caffe_pb2.Datum()
        channels_ok = (img.shape[2] == 3) == is_color
        if channels_ok and not resize_height and not resize_width and _match_ext(str(path), encoding):
            d.data = Path(path).read_bytes()
        else:
            ok, buf = cv2.imencode("." + encoding, img)
            if not ok:
                raise CaffeportError(f"OpenCV cannot encode '{path}' as {encoding!r}")
            d.data = buf.tobytes()
        d.label = int(label)
        d.encoded = True
        return d
    return array_to_datum(np.ascontiguousarray(img.transpose(2, 0, 1)), int(label))


def convert_imageset(
    root_folder: str,
    list_file: str | os.PathLike[str],
    db_name: str | os.PathLike[str],
    gray: bool = False,
    shuffle: bool = False,
    backend: str = "lmdb",
    resize_height: int = 0,
    resize_width: int = 0,
    check_size: bool = False,
    encoded: bool = False,
    encode_type: str = "",
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Write ``db_name`` from the images listed in ``list_file``; returns the number of records.

    Arguments mirror Caffe's flags (``--gray``, ``--shuffle``, ``--backend``, ``--resize_height``,
    ``--resize_width``, ``--check_size``, ``--encoded``, ``--encode_type``). ``progress(done, total)``
    is called after each line; ``log`` receives warnings (default: stderr).
    """
    warn = log or (lambda m: print(m, file=sys.stderr))
    lp = Path(list_file)
    if not lp.is_file():
        raise CaffeportError(f"convert_imageset: list file '{lp}' not found")
    lines = read_image_list(lp, keep_blank=True)
    if shuffle:
        perm = np.random.default_rng(seed).permutation(len(lines))
        lines = [lines[i] for i in perm]
    if (resize_height > 0) != (resize_width > 0):
        warn("convert_imageset: resize needs both resize_height and resize_width > 0; not resizing")
    is_color = not gray
    count = 0
    data_size: int | None = None
    writer = open_writer(db_name, backend, commit_every=1000)
    try:
        for line_id, (name, label) in enumerate(lines):
            enc = encode_type
            if encoded and not enc:
                p = name.rfind(".")
                if p < 0:
                    raise CaffeportError(f"convert_imageset: failed to guess the encoding of '{name}'")
                enc = name[p + 1 :].lower()
            d = image_to_datum(root_folder + name, label, resize_height, resize_width, is_color, enc)
            if d is None:
                warn(f"convert_imageset: could not open or find file {root_folder + name}; skipped")
                if progress:
                    progress(line_id + 1, len(lines))
                continue
            if check_size:
                if data_size is None:
                    data_size = d.channels * d.height * d.width
                elif len(d.data) != data_size:
                    raise CaffeportError(
                        f"convert_imageset: '{name}' has {len(d.data)} bytes of data, the first image "
                        f"{data_size} (--check_size)"
                    )
            writer.put(f"{line_id:08d}_{name}", d.SerializeToString())
            count += 1
            if progress:
                progress(line_id + 1, len(lines))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return count
