"""Upgrade legacy Caffe net and solver definitions to the current format.

Follows BVLC Caffe's upgrade rules (src/caffe/util/upgrade_proto.cpp), in Caffe's order:

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` becomes ``layers { type: CONVOLUTION }``;
   ``padding`` layers are folded into the ``pad`` of the convolution/pooling that reads them.
2. V1 data layers: scale/mean_file/crop_size/mirror move from the data param to transform_param.
3. V1 -> current: ``layers`` with enum types become ``layer`` with type strings; blobs_lr,
   weight_decay, param names and blob_share_mode become ParamSpec entries.
4. Net-level ``input`` + ``input_dim``/``input_shape`` become a leading ``Input`` layer "input".
5. BatchNorm layers that declare exactly 3 param specs get lr_mult = decay_mult = 0 on each.

Solvers: the ``solver_type`` enum becomes the ``type`` string. Each applied step is logged on
the "caffe_alex" logger using Caffe's key phrases, so logs can be grepped the same way.
Where Caffe only logs a problem and carries on, we log a warning; where Caffe aborts, we raise.
"""

from __future__ import annotations

from ..errors import CaffeAlexError
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger()

V1 = caffe_pb2.V1LayerParameter

# ---- V0 -> V1 -------------------------------------------------------------------------------

_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU",
    "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT",
    "tanh": "TANH", "window_data": "WINDOW_DATA",
}  # fmt: skip

_DATA_SOURCES = {
    "data": "data_param",
    "hdf5_data": "hdf5_data_param",
    "images": "image_data_param",
    "window_data": "window_data_param",
}

# V0 field -> {V0 layer type (None: any type): (V1 *_param field, field inside it)}.
# A V0 field set on a layer type not listed is dropped with a warning, as Caffe does.
_V0_FIELDS = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"),
                   "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {**{t: (p, "source") for t, p in _DATA_SOURCES.items()},
               "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {None: ("transform_param", "scale")},
    "meanfile": {None: ("transform_param", "mean_file")},
    "batchsize": {t: (p, "batch_size") for t, p in _DATA_SOURCES.items()},
    "cropsize": {None: ("transform_param", "crop_size")},
    "mirror": {None: ("transform_param", "mirror")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}  # fmt: skip


def _fail(message: str, source_name, *, layer=None, topic=None) -> CaffeAlexError:
    """An upgrade error; ``topic`` ("mixed", "input") lets the reader point at a line."""
    error = CaffeAlexError(message, file=source_name, layer=layer)
    error.topic = topic
    return error


def needs_v0_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(layer.HasField("layer") for layer in net.layers)


def _fold_padding_layers(net: caffe_pb2.NetParameter, source_name) -> caffe_pb2.NetParameter:
    """Drop V0 ``padding`` layers, moving their pad into the conv/pool layer that reads them."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    last_writer = dict.fromkeys(net.input, -1)  # blob -> index of the layer that last wrote it
    for i, conn in enumerate(net.layers):
        kind = conn.layer.type
        if kind != "padding":
            out.layers.add().CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_writer:
                raise _fail(f"unknown bottom blob '{blob}'", source_name, layer=conn.layer.name)
            src = net.layers[last_writer[blob]] if last_writer[blob] >= 0 else None
            if src is None or src.layer.type != "padding":
                continue
            # Caffe only defines a padding layer feeding a single-input conv or pool layer.
            if kind not in ("conv", "pool") or len(conn.bottom) != 1:
                raise _fail(
                    f"reads V0 padding layer '{src.layer.name}', but only a conv or pool layer "
                    "with one bottom may follow a padding layer",
                    source_name,
                    layer=conn.layer.name,
                )
            if len(src.bottom) != 1 or len(src.top) != 1:
                raise _fail(
                    "a V0 padding layer must have one bottom and one top",
                    source_name,
                    layer=src.layer.name,
                )
            out.layers[-1].layer.pad = src.layer.pad
            out.layers[-1].bottom[j] = src.bottom[0]
        for blob in conn.top:
            last_writer[blob] = i
    return out


def _set_v0_field(dst: caffe_pb2.V1LayerParameter, v0, name: str, kind: str) -> bool:
    targets = _V0_FIELDS[name]
    target = targets.get(kind, targets.get(None))
    if target is None:
        log.warning("V0 upgrade: parameter %s is not used by layer type %s; dropped", name, kind)
        return False
    param_name, field_name = target
    value = getattr(v0, name)
    param = getattr(dst, param_name)
    if field_name is None:
        param.CopyFrom(value)
    elif name in ("weight_filler", "bias_filler"):
        getattr(param, field_name).CopyFrom(value)
    elif name == "pool":  # same value names in both enums
        param.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(
            caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
        )
    elif param.DESCRIPTOR.fields_by_name[field_name].is_repeated:  # ConvolutionParameter
        getattr(param, field_name).append(value)
    else:
        setattr(param, field_name, value)
    return True


def _v0_layer_to_v1(conn: caffe_pb2.V1LayerParameter, source_name) -> tuple[V1, bool]:
    v1 = V1(bottom=conn.bottom, top=conn.top)
    ok = True
    if not conn.HasField("layer"):
        return v1, ok
    v0 = conn.layer
    if v0.HasField("name"):
        v1.name = v0.name
    if v0.HasField("type"):
        if v0.type not in _V0_TYPES:
            raise _fail(f"unknown V0 layer type '{v0.type}'", source_name, layer=v0.name)
        v1.type = V1.LayerType.Value(_V0_TYPES[v0.type])
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    for name in _V0_FIELDS:
        if v0.HasField(name):
            ok &= _set_v0_field(v1, v0, name, v0.type)
    return v1, ok


def upgrade_v0_net(
    net: caffe_pb2.NetParameter, source_name=None
) -> tuple[caffe_pb2.NetParameter, bool]:
    """V0 -> V1. Like Caffe, keeps only name, layers, input, input_dim and force_backward."""
    padded = _fold_padding_layers(net, source_name)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    ok = True
    for conn in padded.layers:
        v1, layer_ok = _v0_layer_to_v1(conn, source_name)
        out.layers.append(v1)
        ok &= layer_ok
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out, ok


# ---- V1 data transformation fields ----------------------------------------------------------

_TRANSFORM_OWNERS = {
    V1.DATA: "data_param",
    V1.IMAGE_DATA: "image_data_param",
    V1.WINDOW_DATA: "window_data_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    for layer in net.layers:
        owner = _TRANSFORM_OWNERS.get(layer.type)
        if owner and any(getattr(layer, owner).HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """Move V1 data layers' transformation fields into transform_param (in place)."""
    for layer in net.layers:
        owner = _TRANSFORM_OWNERS.get(layer.type)
        if owner is None:
            continue
        param = getattr(layer, owner)
        for name in _TRANSFORM_FIELDS:
            if param.HasField(name):
                setattr(layer.transform_param, name, getattr(param, name))
                param.ClearField(name)


# ---- V1 -> current --------------------------------------------------------------------------

V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}  # fmt: skip

# Every *_param of V1LayerParameter exists under the same name in LayerParameter.
_V1_PARAM_FIELDS = tuple(f.name for f in V1.DESCRIPTOR.fields if f.name.endswith("_param"))


def needs_v1_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.layers) > 0


def _param_spec(layer: caffe_pb2.LayerParameter, i: int) -> caffe_pb2.ParamSpec:
    while len(layer.param) <= i:
        layer.param.add()
    return layer.param[i]


def upgrade_v1_layer(v1: V1) -> tuple[caffe_pb2.LayerParameter, bool]:
    layer = caffe_pb2.LayerParameter(bottom=v1.bottom, top=v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        layer.type = V1_TYPE_NAMES[V1.LayerType.Name(v1.type)]
    layer.blobs.extend(v1.blobs)
    for i, name in enumerate(v1.param):
        _param_spec(layer, i).name = name
    for i, mode in enumerate(v1.blob_share_mode):  # STRICT/PERMISSIVE: same names in ParamSpec
        _param_spec(layer, i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(
            V1.DimCheckMode.Name(mode)
        )
    for i, lr in enumerate(v1.blobs_lr):
        _param_spec(layer, i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        _param_spec(layer, i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for name in _V1_PARAM_FIELDS:
        if v1.HasField(name):
            getattr(layer, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        log.error("V1 upgrade: layer '%s' also holds a V0 'layer' message; ignored", v1.name)
        return layer, False
    return layer, True


def upgrade_v1_net(
    net: caffe_pb2.NetParameter, source_name=None
) -> tuple[caffe_pb2.NetParameter, bool]:
    if len(net.layer) > 0:
        # Caffe refuses these files instead of guessing how the two lists interleave.
        raise _fail(
            "refusing to upgrade a net that has both 'layer' and legacy 'layers' "
            "entries; rewrite the 'layers { type: ENUM }' entries as "
            "'layer { type: \"Name\" }'",
            source_name,
            topic="mixed",
        )
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    ok = True
    for i, v1 in enumerate(net.layers):
        layer, layer_ok = upgrade_v1_layer(v1)
        out.layer.append(layer)
        if not layer_ok:
            log.error("V1 upgrade: upgrading layer %d ('%s') was incomplete", i, v1.name)
        ok &= layer_ok
    return out, ok


# ---- net-level inputs -----------------------------------------------------------------------


def needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.input) > 0


def upgrade_input_fields(net: caffe_pb2.NetParameter, source_name=None) -> None:
    """Turn input/input_dim/input_shape into a first layer ``input`` of type Input (in place).

    Inputs with no shape at all (old .caffemodel files) are simply dropped, as in Caffe.
    """
    names, shapes, dims = list(net.input), list(net.input_shape), list(net.input_dim)
    if shapes or dims:
        if shapes and len(shapes) < len(names) or not shapes and len(dims) < 4 * len(names):
            need = f"{len(names)} input_shape" if shapes else f"{4 * len(names)} input_dim"
            have = len(shapes) if shapes else len(dims)
            raise _fail(
                f"{len(names)} net input(s) need {need} entries, found {have}",
                source_name,
                topic="input",
            )
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=names)
        for i in range(len(names)):
            shape = layer.input_param.shape.add()
            if shapes:
                shape.CopyFrom(shapes[i])
            else:  # legacy 4-d form: four input_dim entries per input
                shape.dim.extend(dims[4 * i : 4 * i + 4])
        rest = list(net.layer)
        del net.layer[:]
        net.layer.append(layer)
        net.layer.extend(rest)
    for name in ("input", "input_shape", "input_dim"):
        net.ClearField(name)


# ---- BatchNorm ------------------------------------------------------------------------------


def _is_old_batch_norm(layer: caffe_pb2.LayerParameter) -> bool:
    # The old BatchNorm definition asked for three param specs (mean, variance, scale factor).
    return layer.type == "BatchNorm" and len(layer.param) == 3


def needs_batch_norm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(_is_old_batch_norm(layer) for layer in net.layer)


def upgrade_batch_norm(net: caffe_pb2.NetParameter) -> None:
    """Zero lr_mult and decay_mult of the 3 specs (the statistics are not learned); in place."""
    for layer in net.layer:
        if _is_old_batch_norm(layer):
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


# ---- driver ---------------------------------------------------------------------------------


def net_needs_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return (
        needs_v0_upgrade(net)
        or needs_v1_upgrade(net)
        or needs_data_upgrade(net)
        or needs_input_upgrade(net)
        or needs_batch_norm_upgrade(net)
    )


def _attempt(what: str, source_name) -> None:
    log.info(
        "Attempting to upgrade input file specified using deprecated %s: %s",
        what,
        source_name or "<net>",
    )


def _report(what: str, ok: bool) -> None:
    if ok:
        log.info("Successfully upgraded file specified using deprecated %s", what)
    else:
        log.error("Upgrading deprecated %s had problems (see above); continuing", what)


def upgrade_net(
    net_param: caffe_pb2.NetParameter, source_name: str | None = None
) -> caffe_pb2.NetParameter:
    """A current-format copy of ``net_param`` (which is left unchanged), upgraded as Caffe does.

    Raises CaffeAlexError where Caffe would abort (e.g. a net with both layer and layers).
    """
    net = caffe_pb2.NetParameter()
    net.CopyFrom(net_param)
    if needs_v0_upgrade(net):
        _attempt("V0LayerParameter", source_name)
        net, ok = upgrade_v0_net(net, source_name)
        _report("V0LayerParameter", ok)
    if needs_data_upgrade(net):
        _attempt("transformation parameters", source_name)
        upgrade_data_transformation(net)
        _report("data transformation parameters", True)
    if needs_v1_upgrade(net):
        _attempt("V1LayerParameter", source_name)
        net, ok = upgrade_v1_net(net, source_name)
        _report("V1LayerParameter", ok)
    if needs_input_upgrade(net):
        _attempt("input fields", source_name)
        upgrade_input_fields(net, source_name)
        _report("input fields", True)
    if needs_batch_norm_upgrade(net):
        log.info(
            "Attempting to upgrade batch norm layers using deprecated params: %s",
            source_name or "<net>",
        )
        upgrade_batch_norm(net)
        log.info("Successfully upgraded batch norm layers using deprecated params")
    return net


# ---- solvers --------------------------------------------------------------------------------

SOLVER_TYPE_NAMES = {
    "SGD": "SGD",
    "NESTEROV": "Nesterov",
    "ADAGRAD": "AdaGrad",
    "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta",
    "ADAM": "Adam",
}


def solver_needs_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    return solver.HasField("solver_type")


def upgrade_solver(
    solver_param: caffe_pb2.SolverParameter, source_name: str | None = None
) -> caffe_pb2.SolverParameter:
    """A copy with the legacy ``solver_type`` enum replaced by the ``type`` string."""
    solver = caffe_pb2.SolverParameter()
    solver.CopyFrom(solver_param)
    if not solver_needs_upgrade(solver):
        return solver
    if solver.HasField("type"):
        raise _fail(
            "the solver sets both the legacy 'solver_type' (enum) and 'type' (string); "
            "keep only 'type'",
            source_name,
        )
    log.info(
        "Attempting to upgrade input file specified using deprecated 'solver_type' field "
        "(enum): %s",
        source_name or "<solver>",
    )
    enum_name = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
    solver.type = SOLVER_TYPE_NAMES[enum_name]
    solver.ClearField("solver_type")
    log.info(
        "Successfully upgraded file specified using deprecated 'solver_type' field (enum) "
        "to 'type' field (string): %s -> %s",
        enum_name,
        solver.type,
    )
    return solver
