"""Upgrades of old net and solver definitions, step for step as Caffe's ``upgrade_proto.cpp``.

Order (``UpgradeNetAsNeeded``): V0 -> V1 (incl. merging ``padding`` layers into the following
conv/pool), deprecated data-transform fields -> ``transform_param``, V1 ``layers`` -> V2 ``layer``
(enum type -> type string, ``blobs_lr``/``weight_decay`` -> ``param { lr_mult decay_mult }``),
net-level ``input``/``input_dim``/``input_shape`` -> an ``Input`` layer put first, and BatchNorm
layers declaring three ``param`` specs -> each spec forced to ``lr_mult: 0, decay_mult: 0``.
Solvers: ``solver_type`` enum -> ``type``.

Where Caffe only logs an error and carries on (a V0 field given to a layer type that does not take
it) we warn with :class:`~caffeport.io.prototxt.CaffeportWarning`; where Caffe aborts
(``LOG(FATAL)``/``CHECK``) we raise :class:`CaffeportError`.
"""

from __future__ import annotations

import warnings

from caffeport.errors import CaffeportError, CaffeportWarning, nearest
from caffeport.proto import caffe_pb2

__all__ = [
    "upgrade_net",
    "upgrade_solver",
    "net_needs_upgrade",
    "net_needs_v0_to_v1_upgrade",
    "net_needs_v1_to_v2_upgrade",
    "net_needs_data_upgrade",
    "net_needs_input_upgrade",
    "net_needs_batchnorm_upgrade",
    "upgrade_v0_net",
    "upgrade_v1_net",
    "upgrade_net_data_transformation",
    "upgrade_net_input",
    "upgrade_net_batchnorm",
    "solver_needs_type_upgrade",
    "upgrade_solver_type",
    "V1_TYPE_NAMES",
    "V0_TYPE_TO_V1",
]

V1 = caffe_pb2.V1LayerParameter
V0 = caffe_pb2.V0LayerParameter

#: V1LayerParameter.LayerType enum name -> V2 type string (UpgradeV1LayerType).
V1_TYPE_NAMES: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

#: V0 lower-case type string -> V1 enum name (UpgradeV0LayerType).
V0_TYPE_TO_V1: dict[str, str] = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def _warn(msg: str) -> None:
    warnings.warn(msg, CaffeportWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------
def net_needs_v0_to_v1_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Any ``layers`` entry holding a nested V0 ``layer``."""
    return any(lc.HasField("layer") for lc in net.layers)


def net_needs_v1_to_v2_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.layers) > 0


def net_needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """A V1 Data/ImageData/WindowData layer with scale/mean_file/crop_size/mirror in its own param."""
    for lp in net.layers:
        sub = _data_subparam(lp)
        if sub is not None and any(sub.HasField(f) for f in ("scale", "mean_file", "crop_size", "mirror")):
            return True
    return False


def net_needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.input) > 0


def net_needs_batchnorm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(lp.type == "BatchNorm" and len(lp.param) == 3 for lp in net.layer)


def net_needs_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return (
        net_needs_v0_to_v1_upgrade(net)
        or net_needs_v1_to_v2_upgrade(net)
        or net_needs_data_upgrade(net)
        or net_needs_input_upgrade(net)
        or net_needs_batchnorm_upgrade(net)
    )


def _data_subparam(lp: caffe_pb2.V1LayerParameter):
    if lp.type == V1.DATA:
        return lp.data_param
    if lp.type == V1.IMAGE_DATA:
        return lp.image_data_param
    if lp.type == V1.WINDOW_DATA:
        return lp.window_data_param
    return None


# --------------------------------------------------------------------------------------------------
# V0 -> V1
# --------------------------------------------------------------------------------------------------
def _upgrade_v0_padding_layers(net: caffe_pb2.NetParameter, source: str) -> caffe_pb2.NetParameter:
    """Drop V0 ``padding`` layers, moving their ``pad`` onto the conv/pool that consumes them."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    last_top: dict[str, int] = {name: -1 for name in net.input}
    for i, conn in enumerate(net.layers):
        lp = conn.layer
        if lp.type != "padding":
            out.layers.add().CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise CaffeportError(f"{source}: V0 layer '{lp.name}': unknown bottom blob '{blob}'")
            src_idx = last_top[blob]
            if src_idx == -1:
                continue
            src = net.layers[src_idx]
            if src.layer.type == "padding":
                if lp.type not in ("conv", "pool"):
                    raise CaffeportError(
                        f"{source}: V0 padding layer '{src.layer.name}' feeds '{lp.name}' of type "
                        f"'{lp.type}'; only conv/pool layers can absorb a padding layer"
                    )
                if len(conn.bottom) != 1 or len(src.bottom) != 1 or len(src.top) != 1:
                    raise CaffeportError(
                        f"{source}: V0 padding layer '{src.layer.name}' -> '{lp.name}': padding "
                        "merge needs exactly one bottom and one top"
                    )
                tgt = out.layers[len(out.layers) - 1]
                tgt.layer.pad = src.layer.pad
                tgt.bottom[j] = src.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return out


def _upgrade_v0_layer(conn: caffe_pb2.V1LayerParameter, out: caffe_pb2.V1LayerParameter, source: str) -> bool:
    ok = True
    out.Clear()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return ok
    v0 = conn.layer
    t = v0.type
    where = f"{source}: V0 layer '{v0.name}'"

    def bad(field: str) -> None:
        nonlocal ok
        _warn(f"{where}: parameter '{field}' is not used by layer type '{t}' (dropped, as Caffe does)")
        ok = False

    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if t not in V0_TYPE_TO_V1:
            raise CaffeportError(f"{where}: unknown V0 layer type '{t}'{nearest(t, V0_TYPE_TO_V1)}")
        out.type = V1.LayerType.Value(V0_TYPE_TO_V1[t])
    for b in v0.blobs:
        out.blobs.add().CopyFrom(b)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    if v0.HasField("num_output"):
        if t == "conv":
            out.convolution_param.num_output = v0.num_output
        elif t == "innerproduct":
            out.inner_product_param.num_output = v0.num_output
        else:
            bad("num_output")
    if v0.HasField("biasterm"):
        if t == "conv":
            out.convolution_param.bias_term = v0.biasterm
        elif t == "innerproduct":
            out.inner_product_param.bias_term = v0.biasterm
        else:
            bad("biasterm")
    for f in ("weight_filler", "bias_filler"):
        if v0.HasField(f):
            if t == "conv":
                getattr(out.convolution_param, f).CopyFrom(getattr(v0, f))
            elif t == "innerproduct":
                getattr(out.inner_product_param, f).CopyFrom(getattr(v0, f))
            else:
                bad(f)
    if v0.HasField("pad"):
        if t == "conv":
            out.convolution_param.pad.append(v0.pad)
        elif t == "pool":
            out.pooling_param.pad = v0.pad
        else:
            bad("pad")
    if v0.HasField("kernelsize"):
        if t == "conv":
            out.convolution_param.kernel_size.append(v0.kernelsize)
        elif t == "pool":
            out.pooling_param.kernel_size = v0.kernelsize
        else:
            bad("kernelsize")
    if v0.HasField("group"):
        if t == "conv":
            out.convolution_param.group = v0.group
        else:
            bad("group")
    if v0.HasField("stride"):
        if t == "conv":
            out.convolution_param.stride.append(v0.stride)
        elif t == "pool":
            out.pooling_param.stride = v0.stride
        else:
            bad("stride")
    if v0.HasField("pool"):
        if t == "pool":
            # V0 MAX/AVE/STOCHASTIC = 0/1/2, same numbers as PoolingParameter.PoolMethod
            out.pooling_param.pool = int(v0.pool)
        else:
            bad("pool")
    if v0.HasField("dropout_ratio"):
        if t == "dropout":
            out.dropout_param.dropout_ratio = v0.dropout_ratio
        else:
            bad("dropout_ratio")
    for f in ("local_size", "alpha", "beta", "k"):
        if v0.HasField(f):
            if t == "lrn":
                setattr(out.lrn_param, f, getattr(v0, f))
            else:
                bad(f)
    if v0.HasField("source"):
        target = {
            "data": out.data_param,
            "hdf5_data": out.hdf5_data_param,
            "images": out.image_data_param,
            "window_data": out.window_data_param,
            "infogain_loss": out.infogain_loss_param,
        }.get(t)
        if target is not None:
            target.source = v0.source
        else:
            bad("source")
    if v0.HasField("scale"):
        out.transform_param.scale = v0.scale
    if v0.HasField("meanfile"):
        out.transform_param.mean_file = v0.meanfile
    if v0.HasField("batchsize"):
        target = {
            "data": out.data_param,
            "hdf5_data": out.hdf5_data_param,
            "images": out.image_data_param,
            "window_data": out.window_data_param,
        }.get(t)
        if target is not None:
            target.batch_size = v0.batchsize
        else:
            bad("batchsize")
    if v0.HasField("cropsize"):
        out.transform_param.crop_size = v0.cropsize
    if v0.HasField("mirror"):
        out.transform_param.mirror = v0.mirror
    if v0.HasField("rand_skip"):
        if t == "data":
            out.data_param.rand_skip = v0.rand_skip
        elif t == "images":
            out.image_data_param.rand_skip = v0.rand_skip
        else:
            bad("rand_skip")
    for v0f, f in (("shuffle_images", "shuffle"), ("new_height", "new_height"), ("new_width", "new_width")):
        if v0.HasField(v0f):
            if t == "images":
                setattr(out.image_data_param, f, getattr(v0, v0f))
            else:
                bad(v0f)
    if v0.HasField("concat_dim"):
        if t == "concat":
            out.concat_param.concat_dim = v0.concat_dim
        else:
            bad("concat_dim")
    for v0f, f in (
        ("det_fg_threshold", "fg_threshold"),
        ("det_bg_threshold", "bg_threshold"),
        ("det_fg_fraction", "fg_fraction"),
        ("det_context_pad", "context_pad"),
        ("det_crop_mode", "crop_mode"),
    ):
        if v0.HasField(v0f):
            if t == "window_data":
                setattr(out.window_data_param, f, getattr(v0, v0f))
            else:
                bad(v0f)
    if v0.HasField("hdf5_output_param"):
        if t == "hdf5_output":
            out.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
        else:
            bad("hdf5_output_param")
    return ok


def upgrade_v0_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """UpgradeV0Net: a new V1 NetParameter (only name, layers, input, input_dim, force_backward kept)."""
    padded = _upgrade_v0_padding_layers(net, source)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    for conn in padded.layers:
        _upgrade_v0_layer(conn, out.layers.add(), source)
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out


# --------------------------------------------------------------------------------------------------
# data transformation fields
# --------------------------------------------------------------------------------------------------
def upgrade_net_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """Move V1 Data/ImageData/WindowData scale/mean_file/crop_size/mirror into transform_param."""
    for lp in net.layers:
        sub = _data_subparam(lp)
        if sub is None:
            continue
        for f in ("scale", "mean_file", "crop_size", "mirror"):
            if sub.HasField(f):
                setattr(lp.transform_param, f, getattr(sub, f))
                sub.ClearField(f)


# --------------------------------------------------------------------------------------------------
# V1 -> V2
# --------------------------------------------------------------------------------------------------
_V1_PARAM_FIELDS = [
    f.name
    for f in V1.DESCRIPTOR.fields
    if f.name.endswith("_param") and f.name in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
]


def _upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter, out: caffe_pb2.LayerParameter, source: str) -> bool:
    ok = True
    out.Clear()
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    for r in v1.include:
        out.include.add().CopyFrom(r)
    for r in v1.exclude:
        out.exclude.add().CopyFrom(r)
    if v1.HasField("type"):
        enum_name = V1.LayerType.Name(v1.type) if v1.type in V1.LayerType.values() else None
        if enum_name not in V1_TYPE_NAMES:
            raise CaffeportError(f"{source}: V1 layer '{v1.name}': unknown V1 layer type {v1.type}")
        out.type = V1_TYPE_NAMES[enum_name]
    for b in v1.blobs:
        out.blobs.add().CopyFrom(b)

    def spec(i: int) -> caffe_pb2.ParamSpec:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        # V1 STRICT/PERMISSIVE = 0/1, same numbers as ParamSpec.DimCheckMode
        spec(i).share_mode = int(mode)
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, wd in enumerate(v1.weight_decay):
        spec(i).decay_mult = wd
    out.loss_weight.extend(v1.loss_weight)
    for f in _V1_PARAM_FIELDS:
        if v1.HasField(f):
            getattr(out, f).CopyFrom(getattr(v1, f))
    if v1.HasField("layer"):
        _warn(f"{source}: V1 layer '{v1.name}' also holds a V0 layer definition; ignored (as Caffe does)")
        ok = False
    return ok


def upgrade_v1_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """UpgradeV1Net: everything copied, ``layers`` (V1) replaced by ``layer`` (V2)."""
    if len(net.layer):
        _warn(f"{source}: net has both V1 'layers' and V2 'layer' entries; the 'layer' entries are ignored")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    del out.layer[:]
    for v1 in net.layers:
        _upgrade_v1_layer(v1, out.layer.add(), source)
    return out


# --------------------------------------------------------------------------------------------------
# input fields, BatchNorm
# --------------------------------------------------------------------------------------------------
def upgrade_net_input(net: caffe_pb2.NetParameter, source: str = "<net>") -> None:
    """Turn ``input`` + ``input_shape``/``input_dim`` into an ``Input`` layer named "input", put first.

    An ``input`` with neither shape nor dims (legacy caffemodels) is simply dropped, as in Caffe.
    """
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        if has_shape and len(net.input_shape) < len(net.input):
            raise CaffeportError(
                f"{source}: {len(net.input)} input(s) but {len(net.input_shape)} input_shape(s)"
            )
        if not has_shape and len(net.input_dim) < 4 * len(net.input):
            raise CaffeportError(
                f"{source}: {len(net.input)} input(s) need {4 * len(net.input)} input_dim values, "
                f"got {len(net.input_dim)}"
            )
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            layer.top.append(name)
            if has_shape:
                layer.input_param.shape.add().CopyFrom(net.input_shape[i])
            else:
                layer.input_param.shape.add().dim.extend(net.input_dim[4 * i : 4 * i + 4])
        rest = []
        for lp in net.layer:
            c = caffe_pb2.LayerParameter()
            c.CopyFrom(lp)
            rest.append(c)
        del net.layer[:]
        for lp in [layer, *rest]:
            net.layer.add().CopyFrom(lp)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def upgrade_net_batchnorm(net: caffe_pb2.NetParameter) -> None:
    """BatchNorm layers declaring three ``param`` specs get ``lr_mult: 0`` and ``decay_mult: 0`` on
    each, other spec fields (names, share_mode) kept. Some Caffe versions delete the specs instead;
    the reference build (golden ``upgrade_input_fields_batchnorm``) zeroes them."""
    for lp in net.layer:
        if lp.type == "BatchNorm" and len(lp.param) == 3:
            for spec in lp.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """UpgradeNetAsNeeded, in place; returns ``net`` for convenience."""
    if net_needs_v0_to_v1_upgrade(net):
        up = upgrade_v0_net(net, source)
        net.Clear()
        net.CopyFrom(up)
    if net_needs_data_upgrade(net):
        upgrade_net_data_transformation(net)
    if net_needs_v1_to_v2_upgrade(net):
        up = upgrade_v1_net(net, source)
        net.Clear()
        net.CopyFrom(up)
    if net_needs_input_upgrade(net):
        upgrade_net_input(net, source)
    if net_needs_batchnorm_upgrade(net):
        upgrade_net_batchnorm(net)
    return net


def solver_needs_type_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    return solver.HasField("solver_type")


def upgrade_solver_type(solver: caffe_pb2.SolverParameter, source: str = "<solver>") -> None:
    """``solver_type: ADAM`` -> ``type: "Adam"`` (both given is an error, as in Caffe)."""
    if not solver.HasField("solver_type"):
        return
    if solver.HasField("type"):
        raise CaffeportError(
            f"{source}: both the deprecated 'solver_type' (enum) and 'type' (string) are given; keep only 'type'"
        )
    solver.type = _SOLVER_TYPES[int(solver.solver_type)]
    solver.ClearField("solver_type")


def upgrade_solver(solver: caffe_pb2.SolverParameter, source: str = "<solver>") -> caffe_pb2.SolverParameter:
    """UpgradeSolverAsNeeded, in place; returns ``solver``."""
    if solver_needs_type_upgrade(solver):
        upgrade_solver_type(solver, source)
    return solver
