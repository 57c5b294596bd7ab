"""File-format commands: ``caffeport upgrade`` and ``caffeport info``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np

from caffeport.cli._group import main
from caffeport.errors import CaffeportError
from caffeport.proto import caffe_pb2


def _blob_shape(b: caffe_pb2.BlobProto) -> tuple[int, ...]:
    if any(b.HasField(f) for f in ("num", "channels", "height", "width")):
        return (b.num, b.channels, b.height, b.width)
    return tuple(b.shape.dim)


def _fmt_shape(s: tuple[int, ...]) -> str:
    return str(tuple(int(d) for d in s))


@main.command("upgrade")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def upgrade_cmd(src: str, dst: str) -> None:
    """Upgrade an old net (V0/V1 prototxt or caffemodel) or solver to the current format.

    Like Caffe's upgrade_net_proto_text / upgrade_net_proto_binary / upgrade_solver_proto_text:
    the input format (text/binary) is detected from the content, the output format from DST's
    suffix (.prototxt/.pt/.txt -> text, anything else -> binary).
    """
    from caffeport.io.blobs import is_hdf5
    from caffeport.io.prototxt import (
        is_binary,
        parse_text,
        read_text_or_binary,
        sniff_text_kind,
        write_net,
        write_solver,
    )
    from caffeport.io.upgrade import net_needs_upgrade, upgrade_net, upgrade_solver

    if is_hdf5(src):
        raise CaffeportError(f"{src}: HDF5 caffemodels have no legacy format to upgrade")
    data = Path(src).read_bytes()
    if is_binary(data):
        kind = "net"
        msg = read_text_or_binary(src, caffe_pb2.NetParameter())
    else:
        text = data.decode("utf-8", errors="replace")
        kind = sniff_text_kind(text)
        if kind == "labelmap":
            raise CaffeportError(f"{src}: a LabelMap, not a net or solver")
        msg = parse_text(text, caffe_pb2.SolverParameter() if kind == "solver" else caffe_pb2.NetParameter(), src)
    if kind == "net":
        needed = net_needs_upgrade(msg)
        upgrade_net(msg, src)
        write_net(msg, dst)
    else:
        needed = msg.HasField("solver_type")
        upgrade_solver(msg, src)
        write_solver(msg, dst)
    note = "upgraded" if needed else "already up to date; copied"
    click.echo(f"{src} -> {dst}: {kind} {note}")


def _info_built_net(path: str, net: caffe_pb2.NetParameter) -> bool:
    """Build the net (TEST phase) to show top shapes and parameter counts; False if it can't be built
    here (e.g. a data layer whose source is elsewhere)."""
    from caffeport.net import Net

    try:
        built = Net(path)
    except CaffeportError as e:
        click.echo(f"  (not built: {e})", err=True)
        return False
    total = sum(int(p.numel()) for _, _, p, _, _ in built.learnable_params())
    click.echo(f"{path}: net '{net.name}', {len(built.layers)} layers (TEST phase), {total:,} parameters")
    for layer in built.layers:
        tops = built.top_names[layer.name]
        shapes = " ".join(_fmt_shape(built.blobs[t].shape) for t in tops)
        count = sum(int(p.numel()) for p in layer.blobs)
        io = f"{','.join(built.bottom_names[layer.name]) or '-'} -> {','.join(tops) or '-'}"
        click.echo(f"  {layer.name:<24} {layer.param.type:<18} {io:<40} {shapes}" + (f"  [{count:,}]" if count else ""))
    return True


def _info_net(path: str, net: caffe_pb2.NetParameter, weights: bool) -> None:
    if not weights and _info_built_net(path, net):
        return
    total = 0
    rows = []
    for lp in net.layer:
        shapes = [_blob_shape(b) for b in lp.blobs]
        count = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        total += count
        if weights and not shapes:
            continue
        io = f"{','.join(lp.bottom) or '-'} -> {','.join(lp.top) or '-'}"
        blob_s = " ".join(_fmt_shape(s) for s in shapes)
        rows.append(f"  {lp.name:<24} {lp.type or '?':<18} {io:<40} {blob_s}" + (f"  [{count:,}]" if count else ""))
    what = "weights (caffemodel)" if weights else "net"
    click.echo(f"{path}: {what} '{net.name}', {len(net.layer)} layers, {total:,} parameters")
    for r in rows:
        click.echo(r)


def _info_solver(path: str, s: caffe_pb2.SolverParameter) -> None:
    click.echo(f"{path}: solver ({s.type})")
    for f, v in s.ListFields():
        repeated = isinstance(v, Sequence) and not isinstance(v, str | bytes)
        if f.message_type is not None:
            v = f"[{len(v)} messages]" if repeated else "{...}"
        elif repeated:
            v = list(v)
        elif f.enum_type is not None:
            v = f.enum_type.values_by_number[v].name
        elif isinstance(v, float):
            v = str(np.float32(v))
        click.echo(f"  {f.name}: {v}")


@main.command("info")
@click.argument("path", type=click.Path(exists=True))
def info_cmd(path: str) -> None:
    """Say what a Caffe file is and summarise it: net, solver, weights, mean, solverstate, LMDB."""
    from caffeport.io import blobs as B
    from caffeport.io.prototxt import is_binary, parse_solver_text, read_net, sniff_text_kind

    p = Path(path)
    if p.is_dir():
        if (p / "data.mdb").exists():
            import lmdb

            env = lmdb.open(str(p), readonly=True, lock=False, readahead=False)
            try:
                n = env.stat()["entries"]
                with env.begin() as txn:
                    first = next(iter(txn.cursor().iternext(values=False)), None)
            finally:
                env.close()
            click.echo(f"{path}: LMDB database, {n:,} entries" + (f" (first key {first!r})" if first else ""))
        elif (p / "CURRENT").exists():
            click.echo(f"{path}: looks like a LevelDB database (not supported by caffeport; convert to LMDB)")
        else:
            raise CaffeportError(f"{path}: a folder without data.mdb: not an LMDB database")
        return
    if B.is_hdf5(p):
        import h5py

        from caffeport.io.hdf5 import H5_ERRORS

        try:
            f = h5py.File(p, "r")
        except H5_ERRORS as e:
            raise CaffeportError(f"{path}: cannot read as HDF5 (truncated or corrupt?): {e}") from None
        with f:
            if "data" in f and isinstance(f["data"], h5py.Group):
                kind = "caffemodel"
            elif "history" in f and "iter" in f:
                kind = "solverstate"
            else:
                click.echo(f"{path}: HDF5 data file")
                for name, ds in f.items():
                    click.echo(f"  {name}: {getattr(ds, 'shape', '(group)')} {getattr(ds, 'dtype', '')}")
                return
        if kind == "caffemodel":
            net = read_net(p)
            _info_net(path, net, weights=True)
        else:
            from caffeport.io import read_solverstate

            st = read_solverstate(p)
            _info_solverstate(path, st, "HDF5")
        return
    from caffeport.io.safe import read_bounded

    data = read_bounded(p, "Caffe")  # FIFOs/devices refused (they would block or never end), size bounded
    if not is_binary(data):
        text = data.decode("utf-8", errors="replace")
        kind = sniff_text_kind(text)
        if kind == "solver":
            _info_solver(path, parse_solver_text(text, path))
        elif kind == "labelmap":
            from caffeport.io.prototxt import parse_text

            lm = parse_text(text, caffe_pb2.LabelMap(), path)
            click.echo(f"{path}: SSD label map, {len(lm.item)} items")
            for it in lm.item:
                click.echo(f"  {it.label}: {it.name} ({it.display_name})")
        else:
            _info_net(path, read_net(p), weights=False)
        return
    suffix = "".join(p.suffixes).lower()
    if "solverstate" in suffix:
        from caffeport.io import read_solverstate

        _info_solverstate(path, read_solverstate(p), "binary")
        return
    if "binaryproto" in suffix or "mean" in p.name.lower():
        _info_blob(path, B.read_blobproto(p))
        return
    # unknown suffix: a caffemodel if it has named layers, else a BlobProto
    try:
        net = read_net(p)
        if len(net.layer):
            _info_net(path, net, weights=True)
            return
    except CaffeportError:
        pass
    _info_blob(path, B.read_blobproto(p))


def _info_blob(path: str, arr: np.ndarray) -> None:
    click.echo(f"{path}: BlobProto (mean image / blob) of shape {_fmt_shape(arr.shape)} (leading num=1 dropped)")
    if arr.size:
        click.echo(f"  min {arr.min():.4g}  max {arr.max():.4g}  mean {arr.mean():.4g}")
        if arr.ndim == 3:
            click.echo("  per-channel mean: " + " ".join(f"{v:.4g}" for v in arr.reshape(arr.shape[0], -1).mean(1)))


def _info_solverstate(path: str, st, fmt: str) -> None:
    n = sum(h.size for h in st.history)
    click.echo(f"{path}: solverstate ({fmt}), iter {st.iter}, current_step {st.current_step}")
    click.echo(f"  learned_net: {st.learned_net}")
    click.echo(f"  {len(st.history)} history blobs, {n:,} values")
    for i, h in enumerate(st.history):
        click.echo(f"  history[{i}]: {_fmt_shape(h.shape)}")
