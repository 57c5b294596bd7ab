"""Blobs: caffemodel weights, mean ``.binaryproto`` files, BlobProto <-> numpy.

Weights are decoded with a small hand-written scanner of the protobuf wire format: it walks
NetParameter -> ``layer`` (100) / ``layers`` (2, V1; V0 nested ``layer``) -> name + ``blobs`` ->
BlobProto and turns each packed ``data``/``double_data`` payload into numpy with one
``np.frombuffer`` (unpacked encodings are accepted too). ``diff`` is skipped. Everything else in the
file is left to protobuf only when a full message is asked for (:func:`load_caffemodel_net`). There
is no size limit (Caffe raises protobuf's 64 MB limit to 2 GB).

Caffe semantics kept: a blob's shape is its N-D ``shape`` unless any legacy
``num/channels/height/width`` field is present, in which case it is the 4-D legacy shape (Caffe's
``Blob::FromProto``; the net matches legacy shapes by aligning from the end). ``double_data`` wins
over ``data`` when present; weights are returned as float32 (Caffe runs float nets).
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from caffeport.errors import CaffeportError
from caffeport.io.atomic import atomic_write
from caffeport.io.safe import max_blob_elements, read_bounded
from caffeport.proto import caffe_pb2

__all__ = [
    "read_blobproto",
    "write_blobproto",
    "read_blobproto_vector",
    "write_blobproto_vector",
    "blobproto_to_array",
    "array_to_blobproto",
    "atomic_write",
    "is_hdf5",
    "scan_net_blobs",
    "encode_net_blobs",
]

PathLike = str | os.PathLike
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
def is_hdf5(path: PathLike) -> bool:
    """True when the file starts with the HDF5 signature (at 0 or a 512*2^k user-block offset)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # never open a FIFO/device just to sniff it
            return False
        size = st.st_size
        with open(path, "rb") as f:
            off = 0
            while off + 8 <= size:
                f.seek(off)
                if f.read(8) == HDF5_MAGIC:
                    return True
                off = 512 if off == 0 else off * 2
                if off > (1 << 20):
                    break
    except OSError:
        return False
    return False


def _read_file(path: PathLike, what: str) -> bytes:
    """The bytes of a regular file (FIFOs, devices and directories refused, size bounded)."""
    return read_bounded(Path(path), what)


# --------------------------------------------------------------------------------------------------
# wire-format scanner
# --------------------------------------------------------------------------------------------------
class _Corrupt(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("varint too long")


def _next_field(buf: memoryview, pos: int, end: int) -> tuple[int, int, object, int]:
    """(field number, wire type, value, next position); value is an int for varints, else the
    (start, stop) byte range of the payload."""
    key, pos = _varint(buf, pos, end)
    fn, wt = key >> 3, key & 7
    if fn == 0:
        raise _Corrupt("field number 0")
    if wt == 0:
        v, pos = _varint(buf, pos, end)
        return fn, wt, v, pos
    if wt == 2:
        n, pos = _varint(buf, pos, end)
    elif wt == 5:
        n = 4
    elif wt == 1:
        n = 8
    else:
        raise _Corrupt(f"unsupported wire type {wt} (field {fn})")
    if pos + n > end:
        raise _Corrupt(f"field {fn} runs past the end of its message")
    return fn, wt, (pos, pos + n), pos + n


def _fields(buf: memoryview, pos: int, end: int):
    """Yield (field number, wire type, value, next position) for each field in buf[pos:end]."""
    while pos < end:
        fn, wt, val, pos = _next_field(buf, pos, end)
        yield fn, wt, val, pos


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return _signed64(v)


def _unpacked_run(buf: memoryview, vpos: int, end: int, tag: int, width: int, dtype: str) -> tuple[np.ndarray, int]:
    """Decode consecutive unpacked fixed-width values of one field ([value][tag][value]...), the
    first value starting at ``vpos`` (its one-byte tag already read). Returns values, next pos."""
    rec = width + 1
    avail = end - vpos
    nmax = (avail + 1) // rec
    if nmax < 1:
        raise _Corrupt("truncated fixed-width value")
    raw = np.frombuffer(buf, dtype=np.uint8, count=avail, offset=vpos)
    n = 1
    if nmax > 1:
        tags = raw[width : (nmax - 1) * rec : rec]
        bad = np.flatnonzero(tags != tag)
        n = int(bad[0]) + 1 if len(bad) else nmax
    block = np.empty(n * rec, np.uint8)
    block[: n * rec - 1] = raw[: n * rec - 1]
    vals = block.reshape(n, rec)[:, :width].copy().view(dtype).reshape(n)
    return vals, vpos + n * rec - 1


def _decode_blob(buf: memoryview, start: int, end: int) -> np.ndarray:
    shape_dims: list[int] | None = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    data_parts: list[np.ndarray] = []
    dbl_parts: list[np.ndarray] = []
    raw_type: int | None = None
    raw: tuple[int, int] | None = None
    pos = start
    while pos < end:
        key, vpos = _varint(buf, pos, end)
        if key == 0x2D:  # field 5 (data), unpacked fixed32
            vals, pos = _unpacked_run(buf, vpos, end, key, 4, "<f4")
            data_parts.append(vals)
            continue
        if key == 0x41:  # field 8 (double_data), unpacked fixed64
            vals, pos = _unpacked_run(buf, vpos, end, key, 8, "<f8")
            dbl_parts.append(vals)
            continue
        fn, wt, val, pos = _next_field(buf, pos, end)
        if fn == 7 and wt == 2:
            shape_dims = []
            for sfn, swt, sval, _ in _fields(buf, val[0], val[1]):
                if sfn != 1:
                    continue
                if swt == 2:
                    p, q = sval
                    while p < q:
                        d, p = _varint(buf, p, q)
                        shape_dims.append(_signed64(d))
                elif swt == 0:
                    shape_dims.append(_signed64(sval))
        elif fn == 5 and wt == 2:
            a, b = val
            if (b - a) % 4:
                raise _Corrupt("float data payload is not a multiple of 4 bytes")
            data_parts.append(np.frombuffer(buf, dtype="<f4", count=(b - a) // 4, offset=a))
        elif fn == 8 and wt == 2:
            a, b = val
            if (b - a) % 8:
                raise _Corrupt("double data payload is not a multiple of 8 bytes")
            dbl_parts.append(np.frombuffer(buf, dtype="<f8", count=(b - a) // 8, offset=a))
        elif 1 <= fn <= 4 and wt == 0:
            legacy[fn - 1] = _signed32(val)
            has_legacy = True
        elif fn == 10 and wt == 0:
            raw_type = val
        elif fn == 12 and wt == 2:
            raw = val
        # diff (6), double_diff (9) and unknown fields are skipped
    if has_legacy:
        shape = tuple(legacy)
    else:
        shape = tuple(shape_dims or ())
    if any(d < 0 for d in shape):
        raise _Corrupt(f"negative dimension in blob shape {shape}")
    count = 1
    for d in shape:  # exact integers: an int64 product could wrap around
        count *= int(d)
    if count > max_blob_elements():
        raise _Corrupt(f"blob shape {shape} declares {count} elements, more than the limit {max_blob_elements()}")
    if dbl_parts:
        flat = np.concatenate(dbl_parts) if len(dbl_parts) > 1 else dbl_parts[0]
        flat = flat.astype(np.float32)
    elif data_parts:
        flat = np.concatenate(data_parts) if len(data_parts) > 1 else data_parts[0].copy()
    elif raw is not None:
        dt = {0: "<f8", 1: "<f4", 2: "<f2"}.get(raw_type if raw_type is not None else 1)
        if dt is None:
            raise _Corrupt(f"raw_data of unsupported type {raw_type}")
        flat = np.frombuffer(buf, dtype=dt, count=(raw[1] - raw[0]) // np.dtype(dt).itemsize, offset=raw[0])
        flat = flat.astype(np.float32)
    else:
        flat = np.zeros(0, np.float32)
    if flat.size != count:
        raise _Corrupt(f"blob of shape {shape} holds {flat.size} values, expected {count}")
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    return flat.reshape(shape)


def scan_net_blobs(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> OrderedDict[str, list[np.ndarray]]:
    """Decode ``{layer name: [blobs]}`` from a binary NetParameter (V2, V1 or V0 layers).

    Layers without blobs are left out. A layer name seen twice: the last one wins, as when Caffe's
    ``CopyTrainedLayersFrom`` copies every source layer in order.
    """
    buf = memoryview(data)
    out: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    layer_i = 0
    try:
        for fn, wt, val, _ in _fields(buf, 0, len(buf)):
            if wt != 2 or fn not in (100, 2):
                continue
            name_field, blob_field = (1, 7) if fn == 100 else (4, 6)
            name = None
            blobs: list[np.ndarray] = []
            for lfn, lwt, lval, _ in _fields(buf, val[0], val[1]):
                if lwt != 2:
                    continue
                if lfn == name_field:
                    name = bytes(buf[lval[0] : lval[1]]).decode("utf-8", errors="replace")
                elif lfn == blob_field:
                    try:
                        blobs.append(_decode_blob(buf, lval[0], lval[1]))
                    except _Corrupt as e:
                        raise _Corrupt(f"layer #{layer_i} '{name or '?'}' blob {len(blobs)}: {e}") from None
                elif fn == 2 and lfn == 1:  # V0 layer nested in a V1 'layers' entry
                    for vfn, vwt, vval, _ in _fields(buf, lval[0], lval[1]):
                        if vwt != 2:
                            continue
                        if vfn == 1 and name is None:
                            name = bytes(buf[vval[0] : vval[1]]).decode("utf-8", errors="replace")
                        elif vfn == 50:
                            blobs.append(_decode_blob(buf, vval[0], vval[1]))
            layer_i += 1
            if blobs:
                out[name or ""] = blobs
    except (_Corrupt, ValueError, OverflowError, IndexError) as e:
        raise CaffeportError(f"{source}: not a valid caffemodel (truncated or corrupt?): {e}") from None
    return out


# --------------------------------------------------------------------------------------------------
# encoder
# --------------------------------------------------------------------------------------------------
def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_len(fn: int, payload_len: int) -> bytes:
    return _enc_varint((fn << 3) | 2) + _enc_varint(payload_len)


def _blob_body(arr: np.ndarray, legacy: bool = False) -> tuple[bytes, bytes]:
    """A BlobProto's bytes as (header fields, packed float32 data field payload)."""
    a = np.asarray(arr, dtype="<f4")  # (ascontiguousarray would turn a 0-d blob into 1-d)
    head = bytearray()
    if legacy:
        if a.ndim > 4:
            raise CaffeportError(f"a legacy (num, channels, height, width) blob has at most 4 axes, got {a.shape}")
        dims = (1,) * (4 - a.ndim) + tuple(a.shape)
        for fn, d in zip((1, 2, 3, 4), dims):
            head += _enc_varint(fn << 3) + _enc_varint(int(d))
    else:
        dims_payload = b"".join(_enc_varint(int(d)) for d in a.shape)
        shape_msg = _enc_len(1, len(dims_payload)) + dims_payload if a.ndim else b""
        head += _enc_len(7, len(shape_msg)) + shape_msg
    data = a.tobytes(order="C")
    if data:
        head += _enc_len(5, len(data))
    return bytes(head), data


def _blob_field(fn: int, arr: np.ndarray, legacy: bool = False) -> list[bytes]:
    head, data = _blob_body(arr, legacy)
    return [_enc_len(fn, len(head) + len(data)) + head, data]


def encode_net_blobs(weights: Mapping[str, Sequence[np.ndarray]], name: str = "") -> list[bytes]:
    """Binary NetParameter chunks holding one ``layer {name blobs}`` per entry (shape field, float32)."""
    chunks: list[bytes] = []
    if name:
        nb = name.encode()
        chunks.append(_enc_len(1, len(nb)) + nb)
    for lname, blobs in weights.items():
        nb = str(lname).encode()
        inner: list[bytes] = [_enc_len(1, len(nb)) + nb]
        for b in blobs:
            inner.extend(_blob_field(7, np.asarray(b)))
        chunks.append(_enc_len(100, sum(len(c) for c in inner)))
        chunks.extend(inner)
    return chunks


def encode_net_with_blobs(net: caffe_pb2.NetParameter, blobs: Sequence[Sequence[np.ndarray]]) -> list[bytes]:
    """Binary NetParameter chunks: ``net`` (its layers' own ``blobs`` ignored) with ``blobs[i]``
    appended to layer i as packed float32 BlobProtos, without copying weights through protobuf
    messages (what Caffe's ``Net::ToProto`` + ``WriteProtoToBinaryFile`` produce, field order aside)."""
    head = caffe_pb2.NetParameter()
    head.CopyFrom(net)
    del head.layer[:]
    chunks: list[bytes] = [head.SerializeToString()]
    for lp, arrays in zip(net.layer, blobs):
        bare = caffe_pb2.LayerParameter()
        bare.CopyFrom(lp)
        del bare.blobs[:]
        inner: list[bytes] = [bare.SerializeToString()]
        for a in arrays:
            inner.extend(_blob_field(7, np.asarray(a)))
        chunks.append(_enc_len(100, sum(len(c) for c in inner)))
        chunks.extend(inner)
    return chunks


def net_blobs_from_message(net: caffe_pb2.NetParameter) -> OrderedDict[str, list[np.ndarray]]:
    out: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    for lp in net.layer:
        if len(lp.blobs):
            out[lp.name] = [blobproto_to_array(b, float32=True) for b in lp.blobs]
    for lp in net.layers:
        if len(lp.blobs):
            out[lp.name] = [blobproto_to_array(b, float32=True) for b in lp.blobs]
    return out


# --------------------------------------------------------------------------------------------------
# public API: BlobProto
# --------------------------------------------------------------------------------------------------
def blobproto_to_array(blob: caffe_pb2.BlobProto, float32: bool = False) -> np.ndarray:
    """A BlobProto's values with Caffe's shape (legacy 4-D if any of num/channels/height/width is set).

    ``double_data`` gives float64 (float32 with ``float32=True``), ``data`` float32.
    """
    try:
        arr = _decode_blob(memoryview(blob.SerializeToString()), 0, blob.ByteSize())
    except (_Corrupt, ValueError, OverflowError, IndexError) as e:
        raise CaffeportError(f"invalid BlobProto: {e}") from None
    if len(blob.double_data) and not float32:
        shape = arr.shape
        return np.asarray(blob.double_data, dtype=np.float64).reshape(shape)
    return arr


def array_to_blobproto(arr: np.ndarray, legacy: bool = False) -> caffe_pb2.BlobProto:
    """A BlobProto holding ``arr`` as float32 ``data`` with an N-D ``shape`` (or, with ``legacy``,
    num/channels/height/width padded with leading 1s, as ``compute_image_mean`` writes)."""
    head, data = _blob_body(np.asarray(arr), legacy)
    return caffe_pb2.BlobProto.FromString(head + data)


def _blob_from_bytes(data: bytes, source: str) -> np.ndarray:
    try:
        return _decode_blob(memoryview(data), 0, len(data))
    except (_Corrupt, ValueError, OverflowError, IndexError) as e:
        raise CaffeportError(f"{source}: not a valid BlobProto (truncated or corrupt?): {e}") from None


def read_blobproto(path: PathLike) -> np.ndarray:
    """A ``.binaryproto`` blob (e.g. a mean image) as float32. A 4-D blob with num == 1 comes back
    as C x H x W (the leading 1 dropped), which is how mean images are used."""
    data = _read_file(path, "binaryproto")
    if not data:
        raise CaffeportError(f"{path}: empty file, not a BlobProto")
    arr = _blob_from_bytes(data, str(path))
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def write_blobproto(arr: np.ndarray, path: PathLike, legacy: bool = True) -> None:
    """Write a ``.binaryproto``. ``legacy`` (default) writes num/channels/height/width like
    ``compute_image_mean`` (a C x H x W mean becomes 1 x C x H x W); otherwise an N-D ``shape``."""
    head, data = _blob_body(np.asarray(arr), legacy)
    atomic_write(path, [head, data])


def read_blobproto_vector(path: PathLike) -> list[np.ndarray]:
    """A BlobProtoVector file as a list of float32 arrays (shapes as stored, nothing dropped)."""
    data = _read_file(path, "BlobProtoVector")
    buf = memoryview(data)
    out = []
    try:
        for fn, wt, val, _ in _fields(buf, 0, len(buf)):
            if fn == 1 and wt == 2:
                out.append(_decode_blob(buf, val[0], val[1]))
    except (_Corrupt, ValueError, OverflowError, IndexError) as e:
        raise CaffeportError(f"{path}: not a valid BlobProtoVector (truncated or corrupt?): {e}") from None
    return out


def write_blobproto_vector(arrays: Sequence[np.ndarray], path: PathLike, legacy: bool = False) -> None:
    """Write a BlobProtoVector (``blobs`` = field 1), N-D ``shape`` unless ``legacy``."""
    chunks: list[bytes] = []
    for a in arrays:
        chunks.extend(_blob_field(1, np.asarray(a), legacy))
    atomic_write(path, chunks)
