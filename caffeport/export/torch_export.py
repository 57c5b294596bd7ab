"""Files for PyTorch users: weights as a ``state_dict`` of tensors, TorchScript and ``torch.export``.

- :func:`save_state_dict` writes ``{"<layer>.<i>": tensor}`` (Caffe layer name, blob index, Caffe
  shapes) with ``torch.save`` (``.pt``/``.pth``) or safetensors (``.safetensors``, when the package
  is installed). :func:`load_state_dict` reads it back with ``torch.load(..., weights_only=True)`` and
  :func:`state_dict_to_blobs` turns it into the ``{layer: [arrays]}`` that ``Net.copy_from`` takes.
- :func:`export_program` traces a deploy net into TorchScript (``torch.jit.trace``) or a
  ``torch.export`` program. Layers run their ``export_forward(*bottoms)`` when they define one (an
  export-friendly twin of ``forward``, e.g. without custom autograd Functions); every file is loaded
  back and compared with caffeport's forward before it is accepted.
- Generated, readable PyTorch source that needs no caffeport (``export-torch --python``) lives in
  :mod:`caffeport.export.pysource`.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from caffeport.errors import CaffeportError
from caffeport.export.onnx import rel_error
from caffeport.io.atomic import atomic_path

PathLike = str | os.PathLike
EXPORT_HOOK = "export_forward"


def _atomic_save(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temp file over ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def net_state_dict(net: Any) -> OrderedDict[str, torch.Tensor]:
    """``{"<layer>.<i>": tensor}`` for every parameter blob (Caffe order and shapes, CPU, contiguous)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for layer in net.layers:
        for i, p in enumerate(layer.blobs):
            out[f"{layer.name}.{i}"] = p.detach().cpu().contiguous().clone()
    return out


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def save_state_dict(net: Any, path: PathLike) -> None:
    """Write the net's weights as a state_dict file (format from the suffix)."""
    p = Path(path)
    sd = net_state_dict(net)
    if p.suffix == ".safetensors":
        if not _has_safetensors():
            raise CaffeportError(f"{p}: writing .safetensors needs the 'safetensors' package "
                                 "(pip install safetensors), or write a .pt file")
        from safetensors.torch import save_file

        _atomic_save(p, lambda tmp: save_file(dict(sd), tmp))
        return
    _atomic_save(p, lambda tmp: torch.save(dict(sd), tmp))


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict file (``torch.load(..., weights_only=True)`` or safetensors)."""
    p = Path(path)
    if not p.exists():
        raise CaffeportError(f"state_dict file not found: {p}")
    if p.suffix == ".safetensors":
        if not _has_safetensors():
            raise CaffeportError(f"{p}: reading .safetensors needs the 'safetensors' package")
        from safetensors.torch import load_file

        return dict(load_file(str(p)))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or corrupt file
        raise CaffeportError(f"{p}: not a tensor-only state_dict file ({e})") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CaffeportError(f"{p}: expected a dict of tensors")
    return dict(obj)


def state_dict_to_blobs(sd: Mapping[str, torch.Tensor]) -> OrderedDict[str, list[np.ndarray]]:
    """``{"<layer>.<i>": tensor}`` -> ``{layer: [arrays in blob order]}`` (for ``Net.copy_from``)."""
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for key, t in sd.items():
        layer, sep, idx = key.rpartition(".")
        if not sep or not idx.isdigit():
            raise CaffeportError(f"state_dict key {key!r} is not '<layer>.<blob index>'")
        grouped.setdefault(layer, {})[int(idx)] = t.detach().cpu().numpy()
    out: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    for layer, blobs in grouped.items():
        if sorted(blobs) != list(range(len(blobs))):
            raise CaffeportError(f"state_dict: layer '{layer}' has blob indices {sorted(blobs)}")
        out[layer] = [blobs[i] for i in range(len(blobs))]
    return out


class ExportModule(nn.Module):
    """A deploy net as a module with positional inputs and a tuple of outputs (tracing-friendly)."""

    def __init__(self, net: Any):
        super().__init__()
        self.layers = nn.ModuleList(net.layers)
        self._plans = [(list(p.bottoms), list(p.tops), p.layer.is_input) for p in net._plans]
        self.input_names = list(net.inputs)
        self.output_names = list(net.outputs)
        for p in net._plans:
            if p.layer.is_data or p.layer.is_loss:
                raise CaffeportError(f"{net.source}: layer '{p.layer.name}' ({p.layer.param.type}) is not "
                                     "part of a deploy net (derive one first: caffeport deploy)")

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        table: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for layer, (bottoms, tops, is_input) in zip(self.layers, self._plans):
            if is_input:
                continue
            fn = getattr(layer, EXPORT_HOOK, None) or layer
            out = fn(*[table[b] for b in bottoms])
            if isinstance(out, torch.Tensor):
                out = (out,)
            for t, o in zip(tops, out):
                table[t] = o
        return tuple(table[n] for n in self.output_names)


def _random_inputs(net: Any, seed: int, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in net.inputs:
        shape = list(net._shapes[n])
        if batch is not None and shape:
            shape[0] = batch
        out.append(torch.randn(shape, generator=g))
    return tuple(out)


def _compare(net: Any, outs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], what: str,
             tol: float) -> float:
    with torch.no_grad():
        table = net.module.run(dict(zip(net.inputs, inputs)))
    worst = 0.0
    for name, got in zip(net.outputs, outs):
        err = rel_error(got.detach().cpu().numpy(), table[name].detach().cpu().numpy())
        if not err <= tol:
            raise CaffeportError(f"{net.source}: {what} output '{name}' differs from caffeport's forward: "
                                 f"max relative error {err:.3g} > {tol:g}")
        worst = max(worst, err)
    return worst


def export_program(net: Any, path: PathLike, kind: str = "torchscript", *, seed: int = 0,
                   tol: float = 1e-5) -> float:
    """Write a TorchScript (``kind="torchscript"``) or torch.export (``kind="export"``) program of a
    deploy net, load it back, check it on random inputs; returns the max relative error."""
    p = Path(path)
    module = ExportModule(net).eval()
    example = _random_inputs(net, seed)
    check = _random_inputs(net, seed + 1)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit deprecation notes and shape-specialisation notes
            if kind == "torchscript":
                prog = torch.jit.trace(module, example, check_trace=False, strict=False)
                _atomic_save(p, lambda tmp: torch.jit.save(prog, tmp))
                loaded = torch.jit.load(str(p))
                outs = loaded(*check)
            elif kind == "export":
                ep = torch.export.export(module, example)
                _atomic_save(p, lambda tmp: torch.export.save(ep, tmp))
                outs = torch.export.load(str(p)).module()(*check)
            else:
                raise CaffeportError(f"unknown program kind {kind!r} (torchscript or export)")
    except CaffeportError:
        raise
    except Exception as e:
        raise CaffeportError(
            f"{net.source}: {kind} export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"(a layer may need an '{EXPORT_HOOK}' method)") from None
    if isinstance(outs, torch.Tensor):
        outs = (outs,)
    return _compare(net, list(outs), check, kind, tol)
