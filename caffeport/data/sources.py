"""Batch producers for Caffe's data layers: records → transformed numpy batches.

Each ``*Batches`` class owns its reader state (cursor, list position, HDF5 row) and returns one batch
per ``next_batch()`` call as a tuple of float32 arrays, one per top, in Caffe's order:

- :class:`DatumBatches` (``Data``): LMDB/LevelDB records in key order, wrapping around at the end.
- :class:`ImageListBatches` (``ImageData``): a "path label" list file, images read with OpenCV.
- :class:`HDF5Batches` (``HDF5Data``): datasets named after the tops, rows across files, wrapping.

Relative paths (sources, mean files, HDF5 files listed in a list file) resolve as Caffe resolves
them - against the process's working directory - and, when nothing exists there, against the net
file's folder (``ctx.root``); see :func:`resolve_data_path`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from caffeport.data.transformer import DataTransformer
from caffeport.errors import CaffeportError
from caffeport.io.lmdb_store import datum_to_array, open_reader, parse_datum

__all__ = [
    "resolve_data_path",
    "caffe_atoi",
    "read_image_list",
    "read_image",
    "DatumBatches",
    "ImageListBatches",
    "HDF5Batches",
    "RecordStride",
]


def resolve_data_path(path: str | os.PathLike[str], root: Path | None, *extra: Path) -> Path:
    """Where a relative data path points: the cwd first (Caffe's rule), then each folder in ``extra``,
    then ``root`` (the net file's folder). Returns the first candidate that exists, else the cwd one."""
    p = Path(path)
    if p.is_absolute():
        return p
    candidates = [Path.cwd() / p, *(e / p for e in extra)]
    if root is not None:
        candidates.append(Path(root) / p)
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def caffe_atoi(s: str) -> int:
    """C's ``atoi``: optional whitespace and sign, then leading digits; 0 when there are none."""
    t = s.lstrip(" \t\n\r\f\v")
    sign = 1
    if t[:1] in ("+", "-"):
        sign = -1 if t[0] == "-" else 1
        t = t[1:]
    digits = ""
    for ch in t:
        if not ch.isdigit() or not ch.isascii():
            break
        digits += ch
    return sign * int(digits) if digits else 0


def read_image_list(path: Path, keep_blank: bool = False) -> list[tuple[str, int]]:
    """Parse a Caffe image list ("<file> <label>" per line, split at the *last* space, label via atoi).

    A line without a space is a file name with label ``atoi(line)`` (usually 0), as in Caffe.
    A trailing ``\\r`` is dropped. Blank lines are skipped unless ``keep_blank`` (convert_imageset keeps
    them so that record numbers in keys match Caffe's; the ImageData layer would fail on them).
    """
    from caffeport.io.safe import read_text_bounded

    try:
        text = read_text_bounded(path, "image list").decode("utf-8", errors="replace")
    except OSError as e:
        raise CaffeportError(f"cannot read image list '{path}': {e.strerror}") from None
    raw_lines = text.split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()  # the newline ending the last line (getline yields no extra line)
    lines: list[tuple[str, int]] = []
    for raw in raw_lines:
        line = raw.rstrip("\r")
        if not line.strip() and not keep_blank:
            continue
        pos = line.rfind(" ")
        if pos < 0:
            lines.append((line, caffe_atoi(line)))
        else:
            lines.append((line[:pos], caffe_atoi(line[pos + 1 :])))
    return lines


def read_image(path: str | Path, height: int = 0, width: int = 0, is_color: bool = True) -> np.ndarray | None:
    """Caffe's ``ReadImageToCVMat``: ``cv2.imread`` (BGR colour or grayscale) then, when both
    ``height`` and ``width`` are > 0, ``cv2.resize`` with INTER_LINEAR. Returns H,W,C uint8, or None
    when OpenCV cannot read the file."""
    import cv2

    if not os.path.isfile(path):  # a FIFO or device would block cv2.imread forever; a directory fails anyway
        return None
    img = cv2.imread(str(path), cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    if height > 0 and width > 0:
        img = cv2.resize(img, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[:, :, None]
    return img


# --------------------------------------------------------------------------------------------------


class RecordStride:
    """Caffe 1.0's multi-GPU record split (``DataLayer``/``HDF5DataLayer::Skip``): solver ``rank`` of
    ``world`` reads the records whose running offset satisfies ``offset % world == rank`` and skips
    the others, so one iteration of W solvers reads the W·batch consecutive records that one solver
    with a W·batch batch would read (dealt out record by record). TRAIN nets only: Caffe tests on
    rank 0 alone, without skipping."""

    def __init__(self, rank: int = 0, world: int = 1):
        if world < 1 or not 0 <= rank < world:
            raise CaffeportError(f"invalid data-parallel rank {rank} of {world} solvers")
        self.rank, self.world = int(rank), int(world)
        self.offset = 0  # records consumed (read or skipped) so far

    def next_skip(self) -> int:
        """How many records to skip before the next one this rank reads (that one is counted too)."""
        n = (self.rank - self.offset) % self.world
        self.offset += n + 1
        return n


class DatumBatches:
    """Batches from an LMDB/LevelDB of Datums (Caffe's DataLayer ``load_batch``).

    Records are read in key order; after the last record the cursor wraps to the first, so a batch
    larger than the database is legal. The batch's shape comes from its first datum (Caffe reshapes
    per batch); every other datum of the batch must transform to the same shape.
    Encoded datums are decoded by a small thread pool (order preserved; random draws stay in order).
    """

    def __init__(
        self,
        path: Path,
        backend: int | str,
        batch_size: int,
        transformer: DataTransformer,
        with_label: bool,
        where: str,
        rand_skip: int = 0,
        decode_workers: int = 4,
        rank: int = 0,
        world: int = 1,
    ):
        self.where = where
        self.reader = open_reader(path, backend, where)
        self.stride = RecordStride(rank, world)
        self.batch_size = int(batch_size)
        self.tf = transformer
        self.with_label = with_label
        self.decode_workers = decode_workers
        self._pool: ThreadPoolExecutor | None = None
        if rand_skip:
            skip = int(self.tf.rng.integers(rand_skip))
            for _ in range(skip):
                self.reader.next_record()

    def _decode(self, value: bytes) -> tuple[np.ndarray, int]:
        d = parse_datum(value, self.where)
        img = datum_to_array(d, self.tf.force_color, self.tf.force_gray, self.where)
        return img, int(d.label)

    def first_shape(self) -> tuple[int, int, int, int]:
        """(N, C, h, w) of the next batch, from the record under the cursor (Caffe's InferBlobShape)."""
        img, _ = self._decode(self.reader.peek()[1])
        return (self.batch_size, *self.tf.output_shape(*img.shape))

    def next_batch(self) -> tuple[np.ndarray, ...]:
        n = self.batch_size
        values = []
        for _ in range(n):
            for _ in range(self.stride.next_skip()):
                self.reader.next_record()
            values.append(self.reader.next_record()[1])
        use_pool = self.decode_workers > 1 and n > 1
        if use_pool and self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="caffeport-decode")
        if use_pool and parse_datum(values[0], self.where).encoded:
            assert self._pool is not None
            decoded = list(self._pool.map(self._decode, values))
        else:
            decoded = [self._decode(v) for v in values]
        shape0 = self.tf.output_shape(*decoded[0][0].shape)
        data = np.empty((n, *shape0), dtype=np.float32)
        labels = np.empty((n,), dtype=np.float32)
        choices = []
        for i, (img, label) in enumerate(decoded):
            if self.tf.output_shape(*img.shape) != shape0:
                raise CaffeportError(
                    f"{self.where}: record {i} of the batch has shape (C,H,W) {img.shape}, the batch's "
                    f"first record {decoded[0][0].shape}; Caffe needs equal sizes within a batch "
                    "(resize the images, or use batch_size 1)"
                )
            self.tf.check(*img.shape)
            choices.append(self.tf.draw(*img.shape[1:]))  # random draws stay in record order
            labels[i] = label
        if use_pool:
            assert self._pool is not None
            list(self._pool.map(lambda i: self.tf.apply(decoded[i][0], choices[i], data[i]), range(n)))
        else:
            for i in range(n):
                self.tf.apply(decoded[i][0], choices[i], data[i])
        return (data, labels) if self.with_label else (data,)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.reader.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class ImageListBatches:
    """Batches from an image list file (Caffe's ImageDataLayer).

    ``root_folder`` is prepended to each listed name by plain string concatenation (as Caffe does, so
    it needs its trailing slash). ``shuffle`` permutes the list at start-up and at every wrap-around.
    """

    def __init__(
        self,
        list_path: Path,
        root_folder: str,
        batch_size: int,
        transformer: DataTransformer,
        with_label: bool,
        where: str,
        new_height: int = 0,
        new_width: int = 0,
        is_color: bool = True,
        shuffle: bool = False,
        rand_skip: int = 0,
        base: Path | None = None,
    ):
        self.where = where
        if not list_path.is_file():
            raise CaffeportError(f"{where}: image list source '{list_path}' not found")
        self.lines = read_image_list(list_path)
        if not self.lines:
            raise CaffeportError(f"{where}: image list '{list_path}' has no entries")
        if (new_height > 0) != (new_width > 0):
            raise CaffeportError(
                f"{where}: new_height and new_width must be set together (got {new_height} and {new_width})"
            )
        self.root_folder = root_folder
        self.base = base
        self.batch_size = int(batch_size)
        self.tf = transformer
        self.with_label = with_label
        self.new_height, self.new_width, self.is_color = int(new_height), int(new_width), bool(is_color)
        self.shuffle = shuffle
        if shuffle:
            self._shuffle()
        self.pos = 0
        if rand_skip:
            skip = int(self.tf.rng.integers(rand_skip))
            if skip >= len(self.lines):
                raise CaffeportError(
                    f"{where}: rand_skip drew {skip}, not less than the {len(self.lines)} images"
                )
            self.pos = skip

    def _shuffle(self) -> None:
        perm = self.tf.rng.permutation(len(self.lines))
        self.lines = [self.lines[i] for i in perm]

    def _read(self, idx: int) -> np.ndarray:
        name = self.root_folder + self.lines[idx][0]
        path = resolve_data_path(name, self.base)
        img = read_image(path, self.new_height, self.new_width, self.is_color)
        if img is None:
            raise CaffeportError(
                f"{self.where}: could not open or decode image '{name}' (looked for '{path}')"
            )
        return np.ascontiguousarray(img.transpose(2, 0, 1))

    def first_shape(self) -> tuple[int, int, int, int]:
        img = self._read(self.pos)
        return (self.batch_size, *self.tf.output_shape(*img.shape))

    def next_batch(self) -> tuple[np.ndarray, ...]:
        n = self.batch_size
        data: np.ndarray | None = None
        labels = np.empty((n,), dtype=np.float32)
        shape0: tuple[int, ...] = ()
        for i in range(n):
            img = self._read(self.pos)
            shp = self.tf.output_shape(*img.shape)
            if data is None:
                shape0 = shp
                data = np.empty((n, *shp), dtype=np.float32)
            elif shp != shape0:
                raise CaffeportError(
                    f"{self.where}: image '{self.lines[self.pos][0]}' has shape (C,H,W) {img.shape}, "
                    f"unlike the batch's first image; set new_height/new_width or batch_size 1"
                )
            self.tf.transform(img, out=data[i])
            labels[i] = self.lines[self.pos][1]
            self.pos += 1
            if self.pos >= len(self.lines):
                self.pos = 0
                if self.shuffle:
                    self._shuffle()
        assert data is not None
        return (data, labels) if self.with_label else (data,)

    def close(self) -> None:
        pass


class HDF5Batches:
    """Batches from HDF5 files (Caffe's HDF5DataLayer): one dataset per top, rows copied in order.

    The list file holds one .h5 path per whitespace-separated token. A file is loaded whole (every
    dataset converted to float32, as Caffe's ``H5LTread_dataset_float``); batches continue into the
    next file and wrap to the first. ``shuffle`` permutes the file order at each wrap and the rows of
    every loaded file.
    """

    def __init__(
        self,
        list_path: Path,
        tops: list[str],
        batch_size: int,
        where: str,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        root: Path | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.where = where
        self.stride = RecordStride(rank, world)
        if not list_path.is_file():
            raise CaffeportError(f"{where}: HDF5 list source '{list_path}' not found")
        from caffeport.io.safe import read_text_bounded

        names = read_text_bounded(list_path, "HDF5 list").decode("utf-8", errors="replace").split()
        if not names:
            raise CaffeportError(f"{where}: must have at least 1 HDF5 filename listed in '{list_path}'")
        self.files = [resolve_data_path(n, root, list_path.parent) for n in names]
        self.names = names
        self.tops = tops
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.rng = rng if rng is not None else np.random.default_rng()
        self.file_perm = list(range(len(self.files)))
        if shuffle:
            self.file_perm = [int(i) for i in self.rng.permutation(len(self.files))]
        self.cur_file = 0
        self._load(self.file_perm[0])
        self.row = 0
        self.trailing = [a.shape[1:] for a in self.arrays]

    def _load(self, idx: int) -> None:
        import h5py

        from caffeport.io.hdf5 import H5_ERRORS, check_dataset

        path = self.files[idx]
        if not path.is_file():
            raise CaffeportError(
                f"{self.where}: HDF5 file '{self.names[idx]}' not found (looked for '{path}')"
            )
        try:
            with h5py.File(path, "r") as f:
                arrays = []
                for t in self.tops:
                    if t not in f:
                        raise CaffeportError(
                            f"{self.where}: HDF5 file '{path}' has no dataset '{t}' (the tops name the "
                            f"datasets; it has {sorted(f.keys())})"
                        )
                    check_dataset(f[t], f"{self.where}: HDF5 file '{path}' dataset '{t}'")
                    a = np.asarray(f[t][...], dtype=np.float32)
                    if a.ndim < 1:
                        raise CaffeportError(
                            f"{self.where}: dataset '{t}' in '{path}' must have at least 1 axis"
                        )
                    arrays.append(np.ascontiguousarray(a))
        except H5_ERRORS as e:  # corrupt files make h5py raise OSError, RuntimeError, KeyError, ValueError...
            raise CaffeportError(f"{self.where}: failed opening HDF5 file '{path}': {e}") from None
        num = arrays[0].shape[0]
        for t, a in zip(self.tops, arrays):
            if a.shape[0] != num:
                raise CaffeportError(
                    f"{self.where}: in '{path}' dataset '{t}' has {a.shape[0]} rows, "
                    f"'{self.tops[0]}' has {num}"
                )
        if num == 0:
            raise CaffeportError(f"{self.where}: HDF5 file '{path}' has 0 rows")
        if hasattr(self, "trailing"):
            for t, a, want in zip(self.tops, arrays, self.trailing):
                if a.shape[1:] != want:
                    raise CaffeportError(
                        f"{self.where}: dataset '{t}' in '{path}' has row shape {a.shape[1:]}, the first "
                        f"file's is {want}"
                    )
        self.arrays = arrays
        self.row_perm = np.arange(num)
        if self.shuffle:
            self.row_perm = self.rng.permutation(num)

    def top_shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch_size, *a.shape[1:]) for a in self.arrays]

    def _next(self) -> None:
        self.row += 1
        if self.row == self.arrays[0].shape[0]:
            if len(self.files) > 1:
                self.cur_file += 1
                if self.cur_file == len(self.files):
                    self.cur_file = 0
                    if self.shuffle:
                        self.file_perm = [int(i) for i in self.rng.permutation(len(self.files))]
                self._load(self.file_perm[self.cur_file])
            self.row = 0
            if self.shuffle:
                self.row_perm = self.rng.permutation(self.arrays[0].shape[0])

    def next_batch(self) -> tuple[np.ndarray, ...]:
        outs = [np.empty((self.batch_size, *a.shape[1:]), dtype=np.float32) for a in self.arrays]
        for i in range(self.batch_size):
            for _ in range(self.stride.next_skip()):
                self._next()
            r = int(self.row_perm[self.row])
            for o, a in zip(outs, self.arrays):
                o[i] = a[r]
            self._next()
        return tuple(outs)

    def close(self) -> None:
        pass

