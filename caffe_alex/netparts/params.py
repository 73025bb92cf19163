"""A built layer's learnable blobs: the values embedded in its LayerParameter (Caffe's Layer
constructor copies them) and its ParamInfo entries, with Caffe's sharing by ParamSpec name.
``fail(message)`` makes the error located at the layer."""

from __future__ import annotations

import math

import torch

from ..errors import LayerConfigError
from ..fillers import check_blob_shape
from ..formats.blobs import blob_proto_to_array
from ..proto import caffe_pb2
from ..registry import CaffeLayer
from .checks import Fail
from .plan import ParamInfo


def load_embedded_blobs(lp: caffe_pb2.LayerParameter, layer: CaffeLayer, fail: Fail) -> None:
    # Caffe's Layer constructor copies blobs given inside the LayerParameter.
    if not lp.blobs:
        return
    if len(lp.blobs) != len(layer.blobs):
        raise fail(f"has {len(lp.blobs)} embedded blobs, expected {len(layer.blobs)}")
    for index, (proto, param) in enumerate(zip(lp.blobs, layer.blobs)):
        array = _embedded_array(index, proto, fail)
        if array.size != param.numel():
            raise fail(
                f"embedded blob {index} has shape {list(array.shape)}, expected {list(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(torch.from_numpy(array.reshape(tuple(param.shape))))


def _embedded_array(index: int, proto, fail: Fail):
    # Caffe's Blob::FromProto: the shape within Blob::Reshape's limits, then one value per
    # element (double_data when it has any, else data).
    legacy = (proto.num, proto.channels, proto.height, proto.width)
    shape = tuple(proto.shape.dim) if proto.HasField("shape") else legacy
    try:
        shape = check_blob_shape(shape, f"embedded blob {index}")
    except LayerConfigError as exc:
        raise fail(str(exc)) from None
    values = len(proto.double_data) or len(proto.data)
    if values != math.prod(shape):
        raise fail(f"embedded blob {index} holds {values} values for shape {list(shape)}")
    return blob_proto_to_array(proto)


def register_params(
    lp: caffe_pb2.LayerParameter, layer: CaffeLayer, shares: dict[str, ParamInfo], fail: Fail
) -> list[ParamInfo]:
    """The layer's learnable blobs as ParamInfo; a blob whose ParamSpec name an earlier layer
    gave is replaced by that owner's (in ``layer.blobs`` too), a new name is added to
    ``shares``."""
    infos = []
    for index, param in enumerate(layer.blobs):
        spec = lp.param[index] if index < len(lp.param) else caffe_pb2.ParamSpec()
        info = ParamInfo(lp.name, index, param, spec.lr_mult, spec.decay_mult, spec.name)
        info.given = {f for f in ("lr_mult", "decay_mult") if spec.HasField(f)}
        if not param.requires_grad:
            info.lr_mult = 0.0
        if spec.name and spec.name in shares:
            owner = shares[spec.name]
            _check_share(spec, index, owner, param, fail)
            _merge_multipliers(spec, owner, fail)
            layer.blobs[index] = owner.param
            info.param, info.owner = owner.param, (owner.layer, owner.index)
        elif spec.name:
            shares[spec.name] = info
        infos.append(info)
    return infos


def _merge_multipliers(spec, owner: ParamInfo, fail: Fail) -> None:
    # Caffe: a sharer may set a multiplier its owner left unset; both set must agree.
    for name in ("lr_mult", "decay_mult"):
        if not spec.HasField(name):
            continue
        value = getattr(spec, name)
        if name in owner.given and getattr(owner, name) != value:
            raise fail(
                f"shared parameter '{spec.name}' has mismatched {name}: "
                f"{value} here, {getattr(owner, name)} in layer '{owner.layer}'"
            )
        setattr(owner, name, value)
        owner.given.add(name)


def _check_share(spec, index: int, owner: ParamInfo, param, fail: Fail) -> None:
    mine, theirs = tuple(param.shape), tuple(owner.param.shape)
    permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    same = param.numel() == owner.param.numel() if permissive else mine == theirs
    if not same:
        raise fail(
            f"shared parameter '{spec.name}' (blob {index}) has shape {list(mine)}, "
            f"but owner layer '{owner.layer}' has {list(theirs)}"
        )
    if mine != theirs:  # Caffe would share the memory under two shapes; one tensor can't
        raise fail(
            f"PERMISSIVE sharing of '{spec.name}' (blob {index}) with a different shape "
            f"({list(mine)} here, {list(theirs)} in layer '{owner.layer}') is not supported"
        )
