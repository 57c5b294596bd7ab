"""CLI for Caffe's data tools: convert-imageset, compute-image-mean, extract-features.

The command lines are Caffe's (``convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME``...): flags are
accepted as ``--flag=value``, ``--flag value`` and gflags' single-dash ``-flag=value``, and the
underscore names of Caffe's tools work as command names too (``caffeport convert_imageset``).
"""

from __future__ import annotations

import copy
import sys

import click

from caffeport.cli._group import allow_python_layers_option, main


def _opt(name: str, **kw):  # type: ignore[no-untyped-def]
    """An option reachable as --name, --name-with-dashes and -name (gflags style)."""
    decls = [f"--{name}", f"-{name}"]
    if "_" in name:
        decls.insert(1, "--" + name.replace("_", "-"))
    return click.option(*decls, name, **kw)


def _alias(cmd: click.Command, name: str) -> None:
    alias = copy.copy(cmd)
    alias.hidden = True
    main.add_command(alias, name)


@main.command("convert-imageset")
@_opt("gray", is_flag=True, help="Read images as grayscale (1 channel).")
@_opt("shuffle", is_flag=True, help="Shuffle the order of the images first.")
@_opt("backend", default="lmdb", show_default=True, help="lmdb or leveldb.")
@_opt("resize_width", type=int, default=0, help="Resize width (needs --resize_height too).")
@_opt("resize_height", type=int, default=0, help="Resize height (needs --resize_width too).")
@_opt("check_size", is_flag=True, help="Check that all records have the same size.")
@_opt("encoded", is_flag=True, help="Store the encoded image bytes in the Datum.")
@_opt("encode_type", default="", help="Encoding to use with --encoded (default: from the extension).")
@click.argument("root_folder")
@click.argument("list_file", type=click.Path(dir_okay=False))
@click.argument("db_name", type=click.Path())
def convert_imageset_cmd(
    gray: bool,
    shuffle: bool,
    backend: str,
    resize_width: int,
    resize_height: int,
    check_size: bool,
    encoded: bool,
    encode_type: str,
    root_folder: str,
    list_file: str,
    db_name: str,
) -> None:
    """Convert an image list ("path label" per line) into an LMDB/LevelDB of Datums, as Caffe's
    convert_imageset. ROOT_FOLDER is prefixed to every listed path verbatim (keep its trailing /)."""
    from caffeport.tools.imageset import convert_imageset

    bar = None
    progress = None
    if sys.stderr.isatty():
        bar = click.progressbar(length=1, label="convert-imageset", file=sys.stderr)
        bar.__enter__()

        def progress(done: int, total: int) -> None:
            assert bar is not None
            bar.length = total
            bar.update(done - bar.pos)

    try:
        n = convert_imageset(
            root_folder,
            list_file,
            db_name,
            gray=gray,
            shuffle=shuffle,
            backend=backend,
            resize_height=resize_height,
            resize_width=resize_width,
            check_size=check_size,
            encoded=encoded,
            encode_type=encode_type,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(f"Processed {n} files into {db_name}.")


@main.command("compute-image-mean")
@_opt("backend", default="lmdb", show_default=True, help="lmdb or leveldb.")
@click.argument("db", type=click.Path())
@click.argument("output", required=False, type=click.Path(dir_okay=False))
def compute_image_mean_cmd(backend: str, db: str, output: str | None) -> None:
    """Compute the mean image of a Datum database (written as a legacy-shaped .binaryproto),
    as Caffe's compute_image_mean; prints the per-channel means."""
    from caffeport.tools.mean import channel_means, compute_image_mean

    mean = compute_image_mean(db, output, backend)
    click.echo(f"Number of channels: {mean.shape[0]}")
    for c, v in enumerate(channel_means(mean)):
        click.echo(f"mean_value channel [{c}]: {v:g}")
    if output:
        click.echo(f"Wrote {output}")


@main.command("extract-features")
@allow_python_layers_option
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.argument("net", type=click.Path(exists=True, dir_okay=False))
@click.argument("blobs")
@click.argument("dbs")
@click.argument("num_batches", type=int)
@click.argument("db_type", default="lmdb")
@click.argument("device", default="CPU")
@click.argument("device_id", type=int, default=0)
def extract_features_cmd(
    weights: str, net: str, blobs: str, dbs: str, num_batches: int, db_type: str, device: str, device_id: int
) -> None:
    """Caffe's extract_features: WEIGHTS NET BLOB1,BLOB2 DB1,DB2 NUM_BATCHES [lmdb|leveldb] [CPU|GPU]
    [DEVICE_ID]. Runs NET in TEST phase NUM_BATCHES times and stores each blob's items as float Datums
    (keys %010d), one database per blob."""
    from caffeport.tools.features import extract_features

    counts = extract_features(weights, net, blobs, dbs, num_batches, db_type, device, device_id)
    for db, n in counts.items():
        click.echo(f"Extracted {n} features into {db}")


_alias(convert_imageset_cmd, "convert_imageset")
_alias(compute_image_mean_cmd, "compute_image_mean")
_alias(extract_features_cmd, "extract_features")
