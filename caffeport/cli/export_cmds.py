"""Export and surgery commands: export-onnx, export-torch, export-weights, draw, deploy, convolutionalize, truncate."""

from __future__ import annotations

from pathlib import Path

import click

from caffeport.cli._group import allow_python_layers_option, main
from caffeport.errors import CaffeportError

_input_shape_opt = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:N,C,H,W",
    help="Shape of a net input (repeatable), e.g. data:1,3,227,227.")


def _load(model: str, weights: str | None, input_shapes: tuple[str, ...], batch: int | None = None,
          random_seed: int | None = None):
    from caffeport.export.common import load_deploy_net, parse_input_shapes, randomize_weights

    net = load_deploy_net(model, weights, input_shapes=parse_input_shapes(input_shapes), batch=batch)
    if weights is None and random_seed is not None:
        randomize_weights(net, random_seed)
    return net


@main.command("export-onnx")
@allow_python_layers_option
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--weights", "-w", type=click.Path(exists=True, dir_okay=False), help=".caffemodel (or .h5).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (13 or newer).")
@_input_shape_opt
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis of inputs and outputs symbolic.")
@click.option("--tolerance", default=1e-4, show_default=True, type=float,
              help="Largest max-relative error accepted between onnxruntime and caffeport.")
@click.option("--optimize", is_flag=True, help="Fold BatchNorm/Scale/Bias/Power into the preceding conv/fc and "
              "drop TEST Dropout first (caffeport.passes); still checked against the exact net.")
def export_onnx(model: str, weights: str | None, output: str, opset: int, input_shapes: tuple[str, ...],
                dynamic_batch: bool, tolerance: float, optimize: bool = False) -> None:
    """Export MODEL (deploy, or train_val/test: derived first) to ONNX and check it with onnx.checker
    and onnxruntime against caffeport's own forward."""
    from caffeport.export.onnx import check_onnx, net_to_onnx, save_onnx

    net = _load(model, weights, input_shapes)
    if weights is None:
        click.echo("note: no --weights given; the exported weights are the net's fillers", err=True)
    exact = net
    if optimize:
        from caffeport.passes import optimize_net

        net, report = optimize_net(exact)
        click.echo(f"optimized: {report.summary()}", err=True)
    export = net_to_onnx(net, opset=opset, dynamic_batch=dynamic_batch)
    batches = [1, 3] if dynamic_batch else None
    err = check_onnx(export, exact, batch_sizes=batches, tol=tolerance)
    save_onnx(export, output)
    click.echo(f"wrote {output}: opset {opset}, inputs {', '.join(export.inputs)}, outputs "
               f"{', '.join(export.outputs)}; checked ({', '.join(export.checks)}): "
               f"max relative error {err:.3g}")


@main.command("export-torch")
@allow_python_layers_option
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--weights", "-w", type=click.Path(exists=True, dir_okay=False), help=".caffemodel (or .h5).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help=".pt/.pth/.safetensors (state_dict), or the program file with --torchscript/--export.")
@click.option("--torchscript", "kind", flag_value="torchscript", help="Write a TorchScript program.")
@click.option("--export", "kind", flag_value="export", help="Write a torch.export program (.pt2).")
@click.option("--python", "kind", flag_value="python",
              help="Write PyTorch source (OUTPUT.py, one nn.Module 'Net', needs only torch) and its "
                   "state_dict (OUTPUT.pt); import it and call load().")
@_input_shape_opt
@click.option("--optimize", is_flag=True, help="With --python/--torchscript/--export: fold BatchNorm/Scale/Bias/"
              "Power into the preceding conv/fc and drop TEST Dropout first (caffeport.passes); checked "
              "against the exact net within 1e-4 relative.")
def export_torch(model: str, weights: str | None, output: str, kind: str | None,
                 input_shapes: tuple[str, ...], optimize: bool = False) -> None:
    """Export MODEL's weights as a state_dict of tensors (keys '<layer>.<blob index>'), the deploy
    net as a TorchScript / torch.export program, or as generated PyTorch source (--python); programs
    and source are checked against caffeport's forward."""
    from caffeport.export.torch_export import (
        export_program,
        load_state_dict,
        save_state_dict,
        state_dict_to_blobs,
    )

    if optimize and kind is None:
        raise CaffeportError(f"{output}: --optimize changes the layers, so a state_dict of the folded weights "
                             "would not load into MODEL: use it with --python, --torchscript or --export")
    net = _load(model, weights, input_shapes)
    if kind == "python":
        from caffeport.export.pysource import export_python

        if weights is None:
            click.echo("note: no --weights given; the exported weights are the net's fillers", err=True)
        res = export_python(net, output, optimize=optimize)
        if res.report is not None:
            click.echo(f"optimized: {res.report.summary()}", err=True)
        click.echo(f"wrote {res.py} and {res.pt}: class Net, inputs {', '.join(net.inputs)}, outputs "
                   f"{', '.join(net.outputs)}; checked against caffeport: max relative error {res.error:.3g}")
        return
    if kind is None:
        save_state_dict(net, output)
        back = state_dict_to_blobs(load_state_dict(output))
        n = sum(len(v) for v in back.values())
        click.echo(f"wrote {output}: {n} tensors from {len(back)} layers (load with "
                   "torch.load(path, weights_only=True))")
        return
    if optimize:
        from caffeport.passes import optimize_net

        exact = net
        net, report = optimize_net(exact)
        net.source = exact.source
        click.echo(f"optimized: {report.summary()}", err=True)
        export_program(net, output, kind)
        err = _check_program(exact, output, kind)
    else:
        err = export_program(net, output, kind)
    click.echo(f"wrote {output}: {kind} program, inputs {', '.join(net.inputs)}, outputs "
               f"{', '.join(net.outputs)}; checked against caffeport: max relative error {err:.3g}")


def _check_program(exact, path: str, kind: str) -> float:
    """The written (optimized) program against the exact net on random inputs; the file is removed
    when it is off by more than the fold tolerance."""
    import warnings

    import torch

    from caffeport.export.pysource import OPTIMIZE_TOL
    from caffeport.export.torch_export import _compare, _random_inputs

    inputs = _random_inputs(exact, 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.jit.load(path) if kind == "torchscript" else torch.export.load(path).module()
        outs = prog(*inputs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    try:
        return _compare(exact, list(outs), inputs, f"optimized {kind} program", OPTIMIZE_TOL)
    except CaffeportError:
        Path(path).unlink(missing_ok=True)
        raise


@main.command("export-weights")
@allow_python_layers_option
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--weights", "-w", type=click.Path(exists=True, dir_okay=False), help=".caffemodel (or .h5).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
@click.option("--layout", default="caffe", show_default=True, type=click.Choice(["caffe", "channels_last"]),
              help="caffe: Caffe's shapes; channels_last: TensorFlow/Keras kernels (kh,kw,in,out), Dense "
                   "(K,N) with the first Dense after a spatial blob's rows in H,W,C order.")
@_input_shape_opt
def export_weights_cmd(model: str, weights: str | None, output: str, layout: str,
                       input_shapes: tuple[str, ...]) -> None:
    """Write MODEL's weights as an .npz of '<layer>/<kind>' arrays (kernel, bias, gamma, beta, mean,
    var...; BatchNorm's scale factor divided out) for other frameworks; loads with
    np.load(path, allow_pickle=False)."""
    from caffeport.export.weights import export_weights

    net = _load(model, weights, input_shapes)
    if weights is None:
        click.echo("note: no --weights given; the exported weights are the net's fillers", err=True)
    arrays = export_weights(net, output, layout=layout)
    layers = {k.rpartition("/")[0] for k in arrays}
    click.echo(f"wrote {output}: {len(arrays)} arrays from {len(layers)} layers, {layout} layout")


@main.command("draw")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--rankdir", default="LR", show_default=True, type=click.Choice(["LR", "TB", "BT", "RL"]),
              help="Direction of the drawing.")
@click.option("--phase", default="ALL", show_default=True,
              type=click.Choice(["TRAIN", "TEST", "ALL"], case_sensitive=False), help="Layers of which phase.")
@click.option("--display-lrm", is_flag=True, help="Show lr_mult/decay_mult of every parameter.")
def draw(model: str, output: str, rankdir: str, phase: str, display_lrm: bool) -> None:
    """Draw MODEL to OUTPUT (.dot, .png, .svg or .pdf), like Caffe's draw_net.py."""
    from caffeport.export.draw import draw_net_file

    how = draw_net_file(model, output, rankdir=rankdir, phase=phase, display_lrm=display_lrm)
    click.echo(f"wrote {output} ({how})")


@main.command("deploy")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Deploy prototxt to write.")
@_input_shape_opt
@click.option("--batch", type=int, help="Batch size of the inputs (default: the data layer's).")
@click.option("--keep-training-fields", is_flag=True, help="Keep lr/decay multipliers and fillers.")
def deploy(model: str, output: str, input_shapes: tuple[str, ...], batch: int | None,
           keep_training_fields: bool) -> None:
    """Derive the deploy net of a train_val/test MODEL."""
    from caffeport.export.common import parse_input_shapes
    from caffeport.io import read_net, write_net
    from caffeport.surgery import deploy_net

    msg = read_net(model)
    out = deploy_net(msg, input_shapes=parse_input_shapes(input_shapes), batch=batch, source=model,
                     root=Path(model).resolve().parent, keep_training_fields=keep_training_fields)
    write_net(out, output)
    inputs = [f"{lp.top[j]} {tuple(lp.input_param.shape[j].dim)}" for lp in out.layer if lp.type == "Input"
              for j in range(len(lp.top))]
    click.echo(f"wrote {output}: {len(out.layer)} layers, inputs {', '.join(inputs)}")


@main.command("convolutionalize")
@allow_python_layers_option
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--weights", "-w", type=click.Path(exists=True, dir_okay=False), help=".caffemodel to convert.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="New prototxt.")
@click.option("--weights-out", type=click.Path(dir_okay=False), help="New .caffemodel (needs --weights).")
@click.option("--layer", "layers", multiple=True, help="Only these InnerProduct layers (repeatable).")
@click.option("--suffix", default="-conv", show_default=True, help="Appended to converted layer names.")
@_input_shape_opt
def convolutionalize_cmd(model: str, weights: str | None, output: str, weights_out: str | None,
                         layers: tuple[str, ...], suffix: str, input_shapes: tuple[str, ...]) -> None:
    """Recast InnerProduct layers as Convolutions (fully convolutional net, Caffe's net_surgery).
    --input-shape sets the input size of the new net (e.g. larger images for a class map)."""
    from caffeport.export.common import parse_input_shapes, set_input_shapes
    from caffeport.io import load_caffemodel, read_net, save_caffemodel, write_net
    from caffeport.net import Net
    from caffeport.surgery import convolutionalize

    if weights_out and not weights:
        raise CaffeportError("--weights-out needs --weights")
    msg = read_net(model)
    net = Net(msg, root=Path(model).resolve().parent)  # shapes of the original net
    blobs = load_caffemodel(weights) if weights else {}
    out, new_weights = convolutionalize(msg, blobs, net._shapes, suffix=suffix, layers=layers or None)
    if input_shapes:
        set_input_shapes(out, parse_input_shapes(input_shapes), model)
    write_net(out, output)
    msg_out = f"wrote {output}"
    if weights_out:
        save_caffemodel(new_weights, weights_out)
        msg_out += f" and {weights_out}"
    click.echo(msg_out)


@main.command("truncate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--blob", required=True, help="Last blob to keep (its final, post in-place value).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="New prototxt.")
@click.option("--weights", "-w", type=click.Path(exists=True, dir_okay=False), help=".caffemodel to cut too.")
@click.option("--weights-out", type=click.Path(dir_okay=False), help="New .caffemodel (needs --weights).")
def truncate_cmd(model: str, blob: str, output: str, weights: str | None, weights_out: str | None) -> None:
    """Cut MODEL (and weights) after BLOB, keeping only the layers it depends on ("notop")."""
    from caffeport.io import load_caffemodel, read_net, save_caffemodel, write_net
    from caffeport.surgery import truncate

    if weights_out and not weights:
        raise CaffeportError("--weights-out needs --weights")
    msg = read_net(model)
    out, new_weights = truncate(msg, blob, load_caffemodel(weights) if weights else None, source=model)
    write_net(out, output)
    msg_out = f"wrote {output}: {len(out.layer)} of {len(msg.layer)} layers"
    if weights_out and new_weights is not None:
        save_caffemodel(new_weights, weights_out)
        msg_out += f"; {weights_out}: {len(new_weights)} layers of weights"
    click.echo(msg_out)
