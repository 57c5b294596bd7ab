"""pycaffe's mode switches and ``caffe.Net`` (re-exported by :mod:`caffeport.compat`; the
classifier, detector and solver modules import it from here, so the package has no import circle)."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from caffeport.errors import CaffeportError, nearest
from caffeport.net import Net as _Net
from caffeport.net import ParamBlob

_MODE = {"device": "cpu", "device_id": 0}


def set_mode_cpu() -> None:
    _MODE["device"] = "cpu"


def set_mode_gpu() -> None:
    """Use CUDA for nets built afterwards when it is available (otherwise stay on the CPU)."""
    _MODE["device"] = "cuda" if torch.cuda.is_available() else "cpu"


def set_device(device_id: int) -> None:
    _MODE["device_id"] = int(device_id)


def set_random_seed(seed: int) -> None:
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % (2**32))


def _device() -> str:
    return f"cuda:{_MODE['device_id']}" if _MODE["device"] == "cuda" else "cpu"


class _LayerView:
    """pycaffe's layer object (``net.layers[i]``, ``net.layer_dict[name]``): ``type`` (the Caffe type
    string), ``name``, ``blobs`` (the learnable blobs, numpy ``data``/``diff`` views of the parameters)
    and ``reshape()``. Other attributes are those of caffeport's layer module."""

    def __init__(self, layer: Any, net: _Net):
        self._layer = layer
        self._net = net
        self.type = layer.param.type
        self.name = layer.name

    @property
    def blobs(self) -> list[ParamBlob]:
        return [ParamBlob(b) for b in self._layer.blobs]

    def reshape(self, *args: Any) -> None:
        """pycaffe's ``Layer.reshape``: re-propagate the net's shapes (caffeport shapes a whole net at once)."""
        self._net.reshape()

    def setup(self, *args: Any) -> None:
        """Layers are set up when the net is built; nothing to do again."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_layer", "_net"):
            raise AttributeError(name)
        return getattr(self._layer, name)

    def __repr__(self) -> str:
        return f"<caffe layer {self.name!r} ({self.type})>"


class Net(_Net):
    """``caffe.Net(model, weights, phase)`` / ``caffe.Net(model, phase, weights=...)`` /
    ``caffe.Net(model, phase, level=, stages=)``, with pycaffe's whole attribute surface:
    ``blobs``/``params``/``layer_dict``/``top_names``/``bottom_names`` (OrderedDicts),
    ``blob_loss_weights``, ``_layer_names``, ``_blob_names``, ``layers[i].type/blobs``, ``inputs``,
    ``outputs``, ``forward``/``backward`` (``start``/``end`` layer ranges), ``forward_all``,
    ``forward_backward_all``, ``set_input_arrays``, ``reshape``, ``share_with``, ``copy_from``,
    ``save``, ``save_hdf5``/``load_hdf5``, ``clear_param_diffs``, ``before_forward``... callbacks."""

    def __init__(self, model: Any, *args: Any, weights: Any = None, phase: int | None = None,
                 level: int = 0, stages: Any = ()) -> None:
        rest = list(args)
        if rest and isinstance(rest[0], (str, bytes, os.PathLike)):
            weights = rest.pop(0)
        if rest:
            phase = rest.pop(0)
        if rest:
            raise CaffeportError("caffe.Net(model, [weights,] phase): too many arguments")
        if phase is None:
            raise CaffeportError("caffe.Net needs a phase: caffe.TRAIN or caffe.TEST")
        if isinstance(model, bytes):
            model = model.decode()
        if isinstance(weights, bytes):
            weights = weights.decode()
        if weights is not None and not os.path.exists(os.fspath(weights)):
            raise CaffeportError(f"caffe.Net: weights file not found: {os.fspath(weights)}")
        # pycaffe runs Python layers unasked; so does the compat layer (caffeport.Net needs the opt-in)
        super().__init__(model, weights, phase, level=level, stages=tuple(stages or ()), device=_device(),
                         allow_python_layers=True)

    @property
    def layers(self) -> list[_LayerView]:  # type: ignore[override]
        views = self.__dict__.get("_layer_views")
        if views is None:
            views = self.__dict__["_layer_views"] = [_LayerView(p.layer, self) for p in self._plans]
        return views

    @property
    def layer_dict(self) -> OrderedDict[str, _LayerView]:  # type: ignore[override]
        return OrderedDict(zip(self._layer_names, self.layers))

    def forward(self, blobs: Any = None, start: str | None = None, end: str | None = None,
                **kwargs: Any) -> dict[str, np.ndarray]:
        """pycaffe's ``forward``: keyword arguments must be net inputs."""
        bad = [k for k in kwargs if k not in self.inputs]
        if bad:
            raise CaffeportError(f"{self.source}: forward(): {', '.join(map(repr, bad))} "
                                 f"{'is' if len(bad) == 1 else 'are'} not among the net inputs "
                                 f"({', '.join(self.inputs) or 'none'}){nearest(bad[0], self.inputs)}")
        return super().forward(blobs=blobs, start=start, end=end, **kwargs)

    def backward(self, diffs: Any = None, start: str | None = None, end: str | None = None,
                 **kwargs: Any) -> dict[str, np.ndarray]:
        """pycaffe's ``backward``: keyword arguments must be net outputs (their top diffs)."""
        bad = [k for k in kwargs if k not in self.outputs]
        if bad:
            raise CaffeportError(f"{self.source}: backward(): {', '.join(map(repr, bad))} "
                                 f"{'is' if len(bad) == 1 else 'are'} not among the net outputs "
                                 f"({', '.join(self.outputs)}){nearest(bad[0], self.outputs)}")
        return super().backward(diffs=diffs, start=start, end=end, **kwargs)

    def copy_from(self, weights: Any) -> list[str]:  # type: ignore[override]
        if isinstance(weights, bytes):
            weights = weights.decode()
        return super().copy_from(weights)

    def save_hdf5(self, path: Any) -> None:
        """Caffe's ``Net::ToHDF5`` (whatever the file name's extension)."""
        from caffeport.io.hdf5 import write_caffemodel_h5

        write_caffemodel_h5(self.state_blobs(), os.fspath(path))

    def load_hdf5(self, path: Any) -> list[str]:
        """Caffe's ``CopyTrainedLayersFromHDF5``."""
        return self.copy_from(os.fspath(path))

    def share_with(self, other: _Net) -> None:
        """Caffe's ``ShareTrainedLayersWith``: layers named as in ``other`` use its blobs (same memory)."""
        for p in self._plans:
            src = other._layer_dict.get(p.layer.name)
            if src is None or len(p.layer.blobs) == 0:
                continue
            if len(src.blobs) != len(p.layer.blobs):
                raise CaffeportError(f"{self.source}: share_with: layer '{p.layer.name}' has {len(p.layer.blobs)} "
                                     f"blobs, the other net's has {len(src.blobs)}")
            for j, (dst, srcp) in enumerate(zip(p.layer.blobs, src.blobs)):
                if dst.shape != srcp.shape:
                    raise CaffeportError(f"{self.source}: share_with: layer '{p.layer.name}' blob {j}: shape "
                                         f"{tuple(dst.shape)} here, {tuple(srcp.shape)} in the other net")
                dst.data = srcp.data

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """pycaffe's ``set_input_arrays``: the source of the net's first layer, a MemoryData layer."""
        first = self._plans[0].layer if self._plans else None
        if first is None or not hasattr(first, "set_input_arrays"):
            raise CaffeportError(f"{self.source}: set_input_arrays may only be called if the first layer is a "
                                 "MemoryData layer")
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = labels[:, None, None, None]
        first.set_input_arrays(data, labels)

    def _batch(self, blobs: dict[str, Any]) -> Any:
        """pycaffe's ``_batch``: full batches of the first blob's batch size, the last one zero-padded."""
        num = len(next(iter(blobs.values())))
        batch_size = next(iter(self.blobs.values())).shape[0]
        for b in range(num // batch_size):
            i = b * batch_size
            yield {name: blobs[name][i:i + batch_size] for name in blobs}
        rem = num % batch_size
        if rem:
            yield {name: np.concatenate([np.asarray(v[-rem:]), np.zeros((batch_size - rem,) + np.shape(v)[1:])])
                   for name, v in blobs.items()}

    def forward_all(self, blobs: Any = None, **kwargs: Any) -> dict[str, np.ndarray]:
        """pycaffe's ``forward_all``: the inputs' whole first axis in batches (the last padded)."""
        all_outs: dict[str, list[np.ndarray]] = {o: [] for o in set(self.outputs + list(blobs or []))}
        if not kwargs:
            return {o: np.asarray(v) for o, v in all_outs.items()}
        for batch in self._batch(kwargs):
            for out, arr in self.forward(blobs=blobs, **batch).items():
                all_outs[out].extend(arr.copy())
        result = {o: np.asarray(v) for o, v in all_outs.items()}
        pad = len(next(iter(result.values()))) - len(next(iter(kwargs.values())))
        if pad:
            result = {o: v[:-pad] for o, v in result.items()}
        return result

    def forward_backward_all(self, blobs: Any = None, diffs: Any = None,
                             **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """pycaffe's ``forward_backward_all``: inputs and output diffs by name, in batches."""
        all_outs: dict[str, list[np.ndarray]] = {o: [] for o in set(self.outputs + list(blobs or []))}
        all_diffs: dict[str, list[np.ndarray]] = {d: [] for d in set(self.inputs + list(diffs or []))}
        fwd = {k: kwargs[k] for k in self.inputs if k in kwargs}
        bwd = {k: kwargs[k] for k in self.outputs if k in kwargs}
        fb = list(self._batch(fwd)) if fwd else []
        bb = list(self._batch(bwd)) if bwd else []
        for i in range(max(len(fb), len(bb))):
            outs = self.forward(blobs=blobs, **(fb[i] if i < len(fb) else {}))
            ds = self.backward(diffs=diffs, **(bb[i] if i < len(bb) else {}))
            for k, v in outs.items():
                all_outs[k].extend(v.copy())
            for k, v in ds.items():
                all_diffs[k].extend(v.copy())
        r_outs = {k: np.asarray(v) for k, v in all_outs.items()}
        r_diffs = {k: np.asarray(v) for k, v in all_diffs.items()}
        if kwargs and r_outs:
            pad = len(next(iter(r_outs.values()))) - len(next(iter(kwargs.values())))
            if pad:
                r_outs = {k: v[:-pad] for k, v in r_outs.items()}
                r_diffs = {k: v[:-pad] for k, v in r_diffs.items()}
        return r_outs, r_diffs
