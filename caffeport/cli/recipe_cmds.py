"""CLI for the cats-vs-dogs recipe: ``create-lmdb``, ``predict``, ``parse-log``, ``plot-log``.

Thin wrappers over :mod:`caffeport.tools.cats_dogs`, :mod:`caffeport.tools.predict` and
:mod:`caffeport.tools.logs`; the tutorial's scripts, with its paths as arguments.
"""

from __future__ import annotations

import click

from caffeport.cli._group import allow_python_layers_option, main


@main.command("create-lmdb")
@click.argument("train_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--test-dir", type=click.Path(exists=True, file_okay=False),
              help="Also write OUT_DIR/test_lmdb from these unlabelled images (label 0), as the script did.")
@click.option("--width", default=227, show_default=True, help="Resize width.")
@click.option("--height", default=227, show_default=True, help="Resize height.")
@click.option("--seed", default=0, show_default=True, help="Seed of the shuffle before the split.")
@click.option("--no-shuffle", is_flag=True, help="Keep the sorted file order (no shuffle).")
@click.option("--overwrite", is_flag=True, help="Replace existing train_lmdb/validation_lmdb.")
def create_lmdb_cmd(train_dir: str, out_dir: str, test_dir: str | None, width: int, height: int, seed: int,
                    no_shuffle: bool, overwrite: bool) -> None:
    """The tutorial's create_lmdb.py: TRAIN_DIR (Kaggle names cat.<n>.jpg / dog.<n>.jpg) ->
    OUT_DIR/train_lmdb (5/6) and OUT_DIR/validation_lmdb (every 6th image).

    Each image: cv2.imread (BGR), cv2.equalizeHist on every channel, resize to 227x227 with
    INTER_CUBIC, stored as a raw Datum (C,H,W uint8) under the key '{:0>5d}'.format(index).
    Labels come from the file's base name (cat 0, dog 1). The shuffle is seeded (the script's was not).
    """
    from caffeport.tools.cats_dogs import create_lmdb

    r = create_lmdb(train_dir, out_dir, test_dir, width, height, None if no_shuffle else seed, overwrite)
    click.echo(f"{r.train_lmdb}: {r.n_train} records")
    click.echo(f"{r.validation_lmdb}: {r.n_validation} records")
    if r.test_lmdb is not None:
        click.echo(f"{r.test_lmdb}: {r.n_test} records")


@main.command("predict")
@allow_python_layers_option
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Deploy prototxt (an Input layer and a 'prob' output), e.g. caffenet_deploy_2.prototxt.")
@click.option("--weights", required=True, type=click.Path(exists=True, dir_okay=False), help="Trained .caffemodel.")
@click.option("--mean", "mean_file", type=click.Path(exists=True, dir_okay=False),
              help="mean.binaryproto subtracted from every image (as the tutorial's set_mean).")
@click.option("--out", "out", default="submission.csv", show_default=True, type=click.Path(dir_okay=False),
              help="The Kaggle CSV to write (id,label).")
@click.option("--argmax", is_flag=True, help="Write the predicted class (0 cat, 1 dog) instead of P(dog).")
@click.option("--class", "column", default=1, show_default=True, help="Class whose probability is the label.")
@click.option("--batch-size", default=16, show_default=True, help="Images per forward pass.")
@click.option("--prob-blob", default="prob", show_default=True, help="The probability output blob.")
@click.option("--fast", is_flag=True, help="Fast mode: folded BatchNorm/Scale, channels_last, torch.compile, bf16 "
              "where the CPU has it; checked once against the exact forward (caffeport.fast).")
def predict_cmd(images: tuple[str, ...], model: str, weights: str, mean_file: str | None, out: str, argmax: bool,
                column: int, batch_size: int, prob_blob: str, fast: bool) -> None:
    """The tutorial's make_predictions: classify IMAGES (files or folders) and write id,label.

    Preprocessing is create-lmdb's (equalizeHist per channel, INTER_CUBIC resize to the net's input
    size), then float, H,W,C -> C,H,W and minus the mean image. label = probability of dog.
    """
    from caffeport.tools.predict import predict_images, write_submission

    preds = predict_images(model, weights, images, mean_file, batch_size, prob_blob, fast=fast)
    write_submission(preds, out, column=column, argmax=argmax)
    click.echo(f"wrote {out} ({len(preds)} images)")


@main.command("parse-log")
@click.argument("logfile", type=click.Path(exists=True, dir_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False), default=".")
@click.option("--delimiter", default=",", show_default=True, help="Column delimiter.")
def parse_log_cmd(logfile: str, output_dir: str, delimiter: str) -> None:
    """Caffe's tools/extra/parse_log.py: LOGFILE -> OUTPUT_DIR/<log>.train and <log>.test CSV
    (NumIters,Seconds,LearningRate,<net outputs>)."""
    from caffeport.tools.logs import write_parse_log_csv

    written = write_parse_log_csv(logfile, output_dir, delimiter)
    if not written:
        click.echo(f"{logfile}: no 'Train net output' / 'Test net output' lines; nothing written")
    for f in written:
        click.echo(f"wrote {f}")


@main.command("plot-log")
@click.argument("logfile", type=click.Path(exists=True, dir_okay=False))
@click.argument("output_png", type=click.Path(dir_okay=False))
@click.option("--title", default="Training Curve", show_default=True, help="Plot title.")
def plot_log_cmd(logfile: str, output_png: str, title: str) -> None:
    """The tutorial's plot_learning_curve.py: training loss, test loss and test accuracy against
    iterations from a Caffe/caffeport training log, as a PNG."""
    from caffeport.tools.logs import plot_log

    plot_log(logfile, output_png, title)
    click.echo(f"wrote {output_png}")
