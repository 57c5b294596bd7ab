"""Caffe's key/value datasets: ``Datum`` records in LMDB (and LevelDB when ``plyvel`` is installed).

What Caffe writes and how caffeport reads it back:

- A record's value is a serialized ``caffe.Datum``. Raw datums hold uint8 pixels in ``data`` in C,H,W
  order (BGR for colour images, as ``cv::imread`` gives them) with ``channels/height/width`` set, or
  floats in ``float_data``. Encoded datums (``encoded: true``) hold the image file's bytes in ``data``
  and usually leave the dims at 0; they are decoded with OpenCV exactly like Caffe's
  ``DecodeDatumToCVMat`` (``force_color`` / ``force_gray``) or ``DecodeDatumToCVMatNative``
  (``cv::imdecode(..., -1)``: the file's own channel count).
- Keys are byte strings; Caffe's tools write zero-padded counters (``%08d_<file>`` for
  ``convert_imageset``, ``%010d`` for ``extract_features``) so that the byte order of the keys is the
  insertion order. Readers iterate in key order and wrap around to the first record at the end.
- ``DataParameter.backend`` defaults to LEVELDB in Caffe. LevelDB is read and written through
  ``plyvel`` when it is installed; otherwise a clear error says to install it or convert to LMDB.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2

__all__ = [
    "Datum",
    "parse_datum",
    "datum_to_array",
    "array_to_datum",
    "decode_image_bytes",
    "LMDBReader",
    "LMDBWriter",
    "LevelDBReader",
    "LevelDBWriter",
    "open_reader",
    "open_writer",
    "backend_name",
]

Datum = caffe_pb2.Datum

# cv2 flags used by Caffe's io.cpp (IMREAD_UNCHANGED = -1, IMREAD_GRAYSCALE = 0, IMREAD_COLOR = 1).
_IMREAD_UNCHANGED = -1
_IMREAD_GRAYSCALE = 0
_IMREAD_COLOR = 1


def _where(what: str | None) -> str:
    return f"{what}: " if what else ""


def parse_datum(value: bytes, where: str | None = None) -> caffe_pb2.Datum:
    """Parse one record value into a ``Datum`` (CaffeportError if it is not one)."""
    d = caffe_pb2.Datum()
    try:
        d.ParseFromString(value)
    except Exception as e:  # protobuf DecodeError
        raise CaffeportError(f"{_where(where)}record is not a caffe.Datum ({e})") from None
    return d


def decode_image_bytes(data: bytes, flag: int = _IMREAD_UNCHANGED, where: str | None = None) -> np.ndarray:
    """Decode image file bytes with OpenCV; returns H,W,C uint8 (C=1 for grayscale), BGR order.

    ``flag`` is an OpenCV imread flag: -1 (native, Caffe's ``DecodeDatumToCVMatNative``),
    1 (force colour) or 0 (force gray).
    """
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, flag) if buf.size else None
    if img is None:
        raise CaffeportError(f"{_where(where)}could not decode the encoded image ({len(data)} bytes)")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.dtype != np.uint8:
        raise CaffeportError(
            f"{_where(where)}decoded image has dtype {img.dtype}; Caffe only handles 8-bit images"
        )
    return img


def datum_to_array(
    datum: caffe_pb2.Datum,
    force_color: bool = False,
    force_gray: bool = False,
    where: str | None = None,
) -> np.ndarray:
    """The datum's pixels as a (C,H,W) array: uint8 for ``data``/encoded datums, float32 for ``float_data``.

    Encoded datums are decoded with OpenCV: ``force_color`` → 3 channels, ``force_gray`` → 1 channel,
    neither → the file's own channels (Caffe's native decode). Setting both is an error, as in Caffe.
    ``force_*`` are ignored for raw datums (Caffe only logs an error there).
    """
    if datum.encoded:
        if force_color and force_gray:
            raise CaffeportError(f"{_where(where)}cannot set both force_color and force_gray")
        flag = _IMREAD_COLOR if force_color else _IMREAD_GRAYSCALE if force_gray else _IMREAD_UNCHANGED
        img = decode_image_bytes(datum.data, flag, where)
        return np.ascontiguousarray(img.transpose(2, 0, 1))
    c, h, w = int(datum.channels), int(datum.height), int(datum.width)
    if c <= 0:
        raise CaffeportError(f"{_where(where)}datum has channels={c}; Caffe requires channels > 0")
    n = c * h * w
    if len(datum.data) > 0:
        if len(datum.data) != n:
            raise CaffeportError(
                f"{_where(where)}datum data has {len(datum.data)} bytes, channels*height*width = "
                f"{c}*{h}*{w} = {n}"
            )
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data) != n:
        raise CaffeportError(
            f"{_where(where)}datum has {len(datum.float_data)} float_data values, channels*height*width = "
            f"{c}*{h}*{w} = {n}"
        )
    return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A raw Datum from a (C,H,W) array (2-D → 1 channel): uint8 → ``data``, anything else → ``float_data``.

    Like Caffe's ``CVMatToDatum`` the uint8 form sets ``encoded: false`` explicitly; ``label`` is
    written when given (Caffe's tools always set it).
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise CaffeportError(f"array_to_datum needs a (C,H,W) or (H,W) array, got shape {a.shape}")
    d = caffe_pb2.Datum()
    d.channels, d.height, d.width = (int(s) for s in a.shape)
    if a.dtype == np.uint8:
        d.data = np.ascontiguousarray(a).tobytes()
    else:
        d.float_data.extend(np.ascontiguousarray(a, dtype=np.float32).ravel().tolist())
    if label is not None:
        d.label = int(label)
    if a.dtype == np.uint8:
        d.encoded = False
    return d


def backend_name(backend: int | str) -> str:
    """'lmdb' or 'leveldb' from a DataParameter.DB value or a tool's ``--backend`` string."""
    if isinstance(backend, str):
        b = backend.lower()
        if b not in ("lmdb", "leveldb"):
            raise CaffeportError(f"unknown db backend {backend!r} (Caffe knows 'lmdb' and 'leveldb')")
        return b
    return "lmdb" if backend == caffe_pb2.DataParameter.LMDB else "leveldb"


# --------------------------------------------------------------------------------------------------
# LMDB


def _check_lmdb_dir(path: Path, where: str | None) -> None:
    if not path.exists():
        raise CaffeportError(f"{_where(where)}LMDB '{path}' does not exist")
    if not path.is_dir() or not (path / "data.mdb").is_file():
        raise CaffeportError(f"{_where(where)}'{path}' is not an LMDB (expected a folder holding data.mdb)")


# py-lmdb refuses to open one environment twice in a process (e.g. a TRAIN and a TEST net reading
# the same LMDB), so read-only environments are shared by path, with a reference count.
_ENVS: dict[str, list[Any]] = {}
_ENV_LOCK = threading.Lock()


class LMDBReader:
    """Read-only view of an LMDB: ``len()``, ``iter`` → (key, Datum) in key order, ``items()`` → (key,
    serialized bytes), and a wrapping cursor.

    ``next_record()`` returns the next (key, value) and wraps around to the first record after the
    last one, like Caffe's DataLayer cursor. ``where`` (e.g. "net.prototxt: layer 'data'") prefixes
    error messages.
    """

    def __init__(self, path: str | os.PathLike[str], where: str | None = None):
        import lmdb

        self.path = Path(path)
        self.where = where
        _check_lmdb_dir(self.path, where)
        self._key = os.path.realpath(self.path)
        with _ENV_LOCK:
            entry = _ENVS.get(self._key)
            if entry is None:
                try:
                    env = lmdb.open(
                        str(self.path), readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=512,
                    )
                except lmdb.Error as e:
                    raise CaffeportError(f"{_where(where)}cannot open LMDB '{self.path}': {e}") from None
                entry = _ENVS[self._key] = [env, 0]
            entry[1] += 1
            self.env = entry[0]
        self._closed = False
        self._txn: Any = None
        self._cursor: Any = None

    def __len__(self) -> int:
        return int(self.env.stat()["entries"])

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, serialized value) for every record, in key order (independent of the cursor)."""
        with self.env.begin(buffers=False) as txn:
            for k, v in txn.cursor():
                yield bytes(k), bytes(v)

    def __iter__(self) -> Iterator[tuple[bytes, caffe_pb2.Datum]]:
        """(key, Datum) for every record, in key order."""
        for k, v in self.items():
            yield k, parse_datum(v, f"{_where(self.where)}'{self.path}' record {k!r}".rstrip(": "))

    def _ensure_cursor(self) -> None:
        if self._cursor is None:
            self._txn = self.env.begin(buffers=False)
            self._cursor = self._txn.cursor()
            if not self._cursor.first():
                raise CaffeportError(f"{_where(self.where)}LMDB '{self.path}' has no records")

    def peek(self) -> tuple[bytes, bytes]:
        """The record under the cursor, without moving it."""
        self._ensure_cursor()
        return bytes(self._cursor.key()), bytes(self._cursor.value())

    def next_record(self) -> tuple[bytes, bytes]:
        """The record under the cursor; then advance, wrapping to the first record at the end."""
        rec = self.peek()
        if not self._cursor.next():
            self._cursor.first()
        return rec

    def seek_first(self) -> None:
        self._ensure_cursor()
        self._cursor.first()

    def close(self) -> None:
        if self._txn is not None:
            try:
                self._txn.abort()
            except Exception:
                pass
        self._txn = self._cursor = None
        if self._closed:
            return
        self._closed = True
        with _ENV_LOCK:
            entry = _ENVS.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _ENVS[self._key]
                    entry[0].close()

    def __enter__(self) -> LMDBReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LMDBWriter:
    """Write a new LMDB: ``put(key, value)``; commits every ``commit_every`` records and on ``close()``.

    The map size starts at 10 MiB (LMDB's default, as Caffe's LMDB wrapper) and doubles whenever a
    commit does not fit. With ``atomic=True`` (the default) the database is built in
    ``<path>.tmp-<pid>`` and renamed to ``path`` on a successful close; ``path`` must not exist
    (Caffe's ``db::NEW`` refuses an existing folder too).
    """

    def __init__(self, path: str | os.PathLike[str], commit_every: int = 1000, atomic: bool = True):
        import lmdb

        self.path = Path(path)
        if self.path.exists():
            raise CaffeportError(f"output database '{self.path}' already exists; remove it or pick another")
        self.build_path = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}") if atomic else self.path
        if self.build_path.exists():
            shutil.rmtree(self.build_path)
        self.build_path.mkdir(parents=True)
        self.map_size = 10 << 20
        self.env = lmdb.open(str(self.build_path), map_size=self.map_size, subdir=True, meminit=False)
        self.commit_every = max(1, int(commit_every))
        self._pending: list[tuple[bytes, bytes]] = []
        self.count = 0
        self._closed = False

    def put(self, key: bytes | str, value: bytes) -> None:
        k = key.encode() if isinstance(key, str) else bytes(key)
        self._pending.append((k, bytes(value)))
        self.count += 1
        if len(self._pending) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        import lmdb

        if not self._pending:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v)
                break
            except lmdb.MapFullError:
                self.map_size *= 2
                self.env.set_mapsize(self.map_size)
        self._pending.clear()

    def close(self) -> None:
        if self._closed:
            return
        self.commit()
        self.env.close()
        self._closed = True
        if self.build_path != self.path:
            os.rename(self.build_path, self.path)

    def abort(self) -> None:
        """Drop everything written (the temp folder is removed)."""
        if not self._closed:
            self.env.close()
            self._closed = True
        if self.build_path != self.path or self.build_path.exists():
            shutil.rmtree(self.build_path, ignore_errors=True)

    def __enter__(self) -> LMDBWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------------
# LevelDB (optional, via plyvel)


def _plyvel(path: Path, where: str | None) -> Any:
    try:
        import plyvel  # type: ignore[import-not-found]
    except ImportError:
        raise CaffeportError(
            f"{_where(where)}'{path}' is a LevelDB (backend LEVELDB, Caffe's default for Data layers): "
            "reading LevelDB needs `pip install plyvel`, or convert the data to LMDB and set "
            "`backend: LMDB`"
        ) from None
    return plyvel


class LevelDBReader:
    """Same interface as :class:`LMDBReader`, over a LevelDB folder (needs ``plyvel``)."""

    def __init__(self, path: str | os.PathLike[str], where: str | None = None):
        self.path = Path(path)
        self.where = where
        if not self.path.exists():
            raise CaffeportError(f"{_where(where)}LevelDB '{self.path}' does not exist")
        plyvel = _plyvel(self.path, where)
        try:
            self.db = plyvel.DB(str(self.path), create_if_missing=False)
        except Exception as e:
            raise CaffeportError(f"{_where(where)}'{self.path}' is not a LevelDB: {e}") from None
        self._it: Iterator[tuple[bytes, bytes]] | None = None
        self._cur: tuple[bytes, bytes] | None = None

    def __len__(self) -> int:
        return sum(1 for _ in self.db.iterator(include_value=False))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        yield from self.db.iterator()

    def __iter__(self) -> Iterator[tuple[bytes, caffe_pb2.Datum]]:
        for k, v in self.items():
            yield k, parse_datum(v, f"'{self.path}' record {k!r}")

    def _advance(self) -> None:
        assert self._it is not None
        try:
            self._cur = next(self._it)
        except StopIteration:
            self._it = self.db.iterator()
            try:
                self._cur = next(self._it)
            except StopIteration:
                raise CaffeportError(f"{_where(self.where)}LevelDB '{self.path}' has no records") from None

    def peek(self) -> tuple[bytes, bytes]:
        if self._it is None:
            self._it = self.db.iterator()
            self._advance()
        assert self._cur is not None
        return self._cur

    def next_record(self) -> tuple[bytes, bytes]:
        rec = self.peek()
        self._advance()
        return rec

    def seek_first(self) -> None:
        self._it = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LevelDBReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LevelDBWriter:
    """Same interface as :class:`LMDBWriter`, writing a LevelDB folder (needs ``plyvel``)."""

    def __init__(self, path: str | os.PathLike[str], commit_every: int = 1000, atomic: bool = True):
        self.path = Path(path)
        if self.path.exists():
            raise CaffeportError(f"output database '{self.path}' already exists; remove it or pick another")
        plyvel = _plyvel(self.path, None)
        self.build_path = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}") if atomic else self.path
        self.db = plyvel.DB(str(self.build_path), create_if_missing=True, error_if_exists=True)
        self.commit_every = max(1, int(commit_every))
        self._batch = self.db.write_batch()
        self._n = 0
        self.count = 0
        self._closed = False

    def put(self, key: bytes | str, value: bytes) -> None:
        self._batch.put(key.encode() if isinstance(key, str) else bytes(key), bytes(value))
        self._n += 1
        self.count += 1
        if self._n >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        self._batch.write()
        self._batch = self.db.write_batch()
        self._n = 0

    def close(self) -> None:
        if self._closed:
            return
        self.commit()
        self.db.close()
        self._closed = True
        if self.build_path != self.path:
            os.rename(self.build_path, self.path)

    def abort(self) -> None:
        if not self._closed:
            self.db.close()
            self._closed = True
        shutil.rmtree(self.build_path, ignore_errors=True)

    def __enter__(self) -> LevelDBWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_reader(path: str | os.PathLike[str], backend: int | str = "lmdb", where: str | None = None):
    """An :class:`LMDBReader` or :class:`LevelDBReader` for ``path``."""
    if backend_name(backend) == "lmdb":
        return LMDBReader(path, where)
    return LevelDBReader(path, where)


def open_writer(path: str | os.PathLike[str], backend: int | str = "lmdb", commit_every: int = 1000):
    """An :class:`LMDBWriter` or :class:`LevelDBWriter` creating ``path`` (which must not exist)."""
    if backend_name(backend) == "lmdb":
        return LMDBWriter(path, commit_every)
    return LevelDBWriter(path, commit_every)
