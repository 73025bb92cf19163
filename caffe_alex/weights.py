"""Trained weights in Caffe's formats: ``.caffemodel`` (binary NetParameter, current, V1 and V0
records), ``.caffemodel.h5`` (Net::ToHDF5's layout) and ``.binaryproto`` mean files; copying
them into a Net with Caffe's Net::CopyTrainedLayersFrom rules, and writing a Net's blobs back.

A caffemodel is read by walking the protobuf wire format here: the generated classes would
hold every float as a Python-level repeated field (slow, several copies, and the C++ runtime's
64 MB limit in older protobufs). Only the small non-blob parts of each layer go through
caffe_pb2; blob data is a zero-copy numpy view of the memory-mapped file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import message as pb_message

from .errors import CaffeAlexError, reading
from .log import get_logger
from .proto import caffe_pb2

log = get_logger()


@dataclass
class Blob:
    """One stored blob: its data array (float32, or float64 from ``double_data``) and shape.

    ``legacy`` marks a shape given as num/channels/height/width (matched by trailing dims).
    """

    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool = False
    diff: np.ndarray | None = None


@dataclass
class LayerWeights:
    """A layer of a weights file: its name, type, blobs (None = absent in an HDF5 file), and
    the layer's definition without blobs where the format stores one."""

    name: str
    type: str = ""
    blobs: list[Blob | None] = field(default_factory=list)
    param: caffe_pb2.LayerParameter | None = None


@dataclass
class WeightSet:
    """The layers of one weights file, in file order."""

    layers: list[LayerWeights]
    path: str | None = None
    format: str = "caffemodel"  # or "h5", "pt", "safetensors"
    version: str = "current"  # V0, V1 or current (caffemodel)
    net_name: str = ""

    def has_definitions(self) -> bool:
        return all(lw.param is not None for lw in self.layers)


# ---- the protobuf wire format --------------------------------------------------------------


class _WireError(Exception):
    def __init__(self, reason: str, pos: int):
        super().__init__(reason)
        self.reason, self.pos = reason, pos


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _WireError("truncated varint", start)
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _WireError("malformed varint", start)


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, value start, value end, field start) of a message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0", field_start)
        if wire == 0:
            _, value_end = _varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:
            raise _WireError(f"invalid wire type {wire}", field_start)
        if value_end > end:
            raise _WireError(
                f"field {number} truncated ({value_end - pos} bytes declared, {end - pos} remain)",
                field_start,
            )
        yield number, wire, pos, value_end, field_start
        pos = value_end


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


# ---- reading blobs and layers --------------------------------------------------------------

_FLOAT_FIELDS = {5: ("data", "<f4"), 6: ("diff", "<f4"), 8: ("double_data", "<f8")}
_FLOAT_FIELDS[9] = ("double_diff", "<f8")


def _floats(buf, wire: int, s: int, e: int, dtype: str):
    size = np.dtype(dtype).itemsize
    if wire == 2:  # packed, as Caffe writes it: a zero-copy view of the file
        if (e - s) % size:
            raise _WireError(f"packed {dtype[1:]} data of {e - s} bytes", s)
        return np.frombuffer(buf, dtype=dtype, count=(e - s) // size, offset=s)
    if wire == (5 if size == 4 else 1):  # unpacked: one element per field (legal, rare)
        return np.frombuffer(buf, dtype=dtype, count=1, offset=s)
    raise _WireError(f"wire type {wire} for a float field", s)


def _parse_blob(buf, start: int, end: int) -> Blob:
    parts: dict[str, list[np.ndarray]] = {}
    rest = bytearray()
    for number, wire, s, e, fs in _fields(buf, start, end):
        if number in _FLOAT_FIELDS:
            name, dtype = _FLOAT_FIELDS[number]
            parts.setdefault(name, []).append(_floats(buf, wire, s, e, dtype))
        else:
            rest += buf[fs:e]
    try:
        proto = caffe_pb2.BlobProto.FromString(bytes(rest))
    except pb_message.DecodeError:
        raise _WireError("not a BlobProto", start) from None
    legacy = any(proto.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = (
        (proto.num, proto.channels, proto.height, proto.width) if legacy else tuple(proto.shape.dim)
    )
    data = _join(parts.get("double_data")) if "double_data" in parts else _join(parts.get("data"))
    diff = _join(parts.get("double_diff") or parts.get("diff"))
    count = int(np.prod(shape, dtype=np.int64))
    if data.size != count:
        raise _WireError(f"blob of shape {list(shape)} holds {data.size} values", start)
    return Blob(data, tuple(int(d) for d in shape), legacy, diff if diff.size else None)


def _join(arrays: list[np.ndarray] | None) -> np.ndarray:
    if not arrays:
        return np.zeros(0, np.float32)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _strip_blobs(buf, start: int, end: int, blob_field: int, v0_field: int | None):
    """A layer message without its blobs (bytes) and the blobs. In a V1 record, the nested V0
    layer (``v0_field``) holds the blobs instead (V0LayerParameter.blobs is field 50)."""
    rest, blobs = bytearray(), []
    for number, wire, s, e, fs in _fields(buf, start, end):
        if number == blob_field and wire == 2:
            blobs.append(_parse_blob(buf, s, e))
        elif number == v0_field and wire == 2:
            inner, inner_blobs = _strip_blobs(buf, s, e, 50, None)
            rest += _length_delimited(number, inner)
            blobs.extend(inner_blobs)
        else:
            rest += buf[fs:e]
    return bytes(rest), blobs


_NET_FIELDS = {f.number: f for f in caffe_pb2.NetParameter.DESCRIPTOR.fields}
_DELIMITED_TYPES = {9, 11, 12}  # string, message, bytes: always wire type 2
_LAYER, _V1_LAYERS = 100, 2


def _parse_layer(buf, s: int, e: int, number: int):
    if number == _LAYER:
        rest, blobs = _strip_blobs(buf, s, e, 7, None)
        cls = caffe_pb2.LayerParameter
    else:
        rest, blobs = _strip_blobs(buf, s, e, 6, 1)
        cls = caffe_pb2.V1LayerParameter
    try:
        cls.FromString(rest)
    except pb_message.DecodeError:
        raise _WireError(f"not a {cls.DESCRIPTOR.name}", s) from None
    return rest, blobs


def _parse_net(buf, size: int):
    """(NetParameter without blobs, blobs of each layer record in file order)."""
    rest, records = bytearray(), []
    for number, wire, s, e, fs in _fields(buf, 0, size):
        if number not in _NET_FIELDS:
            raise _WireError(f"unknown field {number}", fs)
        if _NET_FIELDS[number].type in _DELIMITED_TYPES and wire != 2:
            raise _WireError(f"field {number} ({_NET_FIELDS[number].name}) of wire type {wire}", fs)
        if number in (_LAYER, _V1_LAYERS) and wire == 2:
            layer_rest, blobs = _parse_layer(buf, s, e, number)
            rest += _length_delimited(number, layer_rest)
            records.append(blobs)
        else:
            rest += buf[fs:e]
    try:
        net = caffe_pb2.NetParameter.FromString(bytes(rest))
    except pb_message.DecodeError:
        raise _WireError("failed to parse", 0) from None
    return net, records


def _map_file(path: str):
    with reading(path), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b"", 0
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def _version(net: caffe_pb2.NetParameter) -> str:
    if any(v1.HasField("layer") for v1 in net.layers):
        return "V0"
    return "V1" if len(net.layers) else "current"


def read_caffemodel(path) -> WeightSet:
    """Read a binary NetParameter with blobs, upgrading V0/V1 records as Caffe does."""
    from .upgrade import upgrade_net

    path = os.fspath(path)
    buf, size = _map_file(path)
    try:
        raw, records = _parse_net(buf, size)
    except _WireError as exc:
        raise CaffeAlexError(
            f"{path}: not a caffemodel (NetParameter): {exc.reason} at byte {exc.pos}"
        ) from None
    if not records:
        raise CaffeAlexError(f"{path}: not a caffemodel: the NetParameter has no layers")
    version = _version(raw)
    names = [(v1.layer.name if v1.HasField("layer") else v1.name) for v1 in raw.layers]
    names += [lp.name for lp in raw.layer]  # Caffe refuses files with both; upgrade says so
    net = upgrade_net(raw, path)
    layers, j = [], 0
    for lp in net.layer:  # the upgrade keeps the order; it drops V0 padding layers (no blobs)
        # and may add an input layer first (none): match records by name going forward
        k = next((i for i in range(j, len(names)) if names[i] == lp.name), None)
        blobs = [] if k is None else records[k]
        j = j if k is None else k + 1
        layers.append(LayerWeights(lp.name, lp.type, list(blobs), lp))
    _note_doubles(path, layers)
    return WeightSet(layers, path, "caffemodel", version, net.name)


def _note_doubles(path, layers) -> None:
    if any(b is not None and b.data.dtype == np.float64 for lw in layers for b in lw.blobs):
        log.info("%s: blobs stored as double_data are converted to float32", path)


# ---- writing a caffemodel ------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` to write to; on success it is fsynced and renamed over
    ``path``, so an interrupted write never leaves a truncated file under the final name."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as exc:
        raise CaffeAlexError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _float_field(number: int, array: np.ndarray) -> list:
    if array.size == 0:  # an empty packed field is not written at all
        return []
    raw = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    return [_key(number, 2) + _encode_varint(raw.nbytes), memoryview(raw).cast("B")]


def _blob_pieces(data: np.ndarray, diff: np.ndarray | None) -> list:
    """BlobProto as Caffe's Blob<float>::ToProto writes it: data (5), diff (6), shape (7)."""
    shape = caffe_pb2.BlobShape(dim=data.shape).SerializeToString()
    pieces = _float_field(5, data)
    if diff is not None:
        pieces += _float_field(6, diff)
    pieces.append(_length_delimited(7, shape))
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
    return [_key(7, 2) + _encode_varint(size)] + pieces


def _layer_pieces(lp: caffe_pb2.LayerParameter, blobs) -> list:
    """A LayerParameter with blobs, blobs (field 7) placed in field order as C++ writes."""
    bare = caffe_pb2.LayerParameter()
    bare.CopyFrom(lp)
    bare.ClearField("blobs")
    data = bare.SerializeToString()
    split = next((fs for n, _, _, _, fs in _fields(data, 0, len(data)) if n > 7), len(data))
    pieces = [data[:split]]
    for blob_data, diff in blobs:
        pieces += _blob_pieces(blob_data, diff)
    pieces.append(data[split:])
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
    return [_key(_LAYER, 2) + _encode_varint(size)] + pieces


def write_caffemodel(path, net_name: str, layers) -> None:
    """Write ``layers`` — (LayerParameter, [(data, diff or None), ...]) pairs — as a binary
    NetParameter (Net::ToProto's layout), streaming blob data from the arrays."""
    head = caffe_pb2.NetParameter(name=net_name).SerializeToString() if net_name else b""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for lp, blobs in layers:
            for piece in _layer_pieces(lp, blobs):
                f.write(piece)


def weightset_layers(ws: WeightSet):
    """A WeightSet as write_caffemodel's (LayerParameter, blobs) pairs."""
    if not ws.has_definitions():
        raise CaffeAlexError(
            f"{ws.path}: this {ws.format} file has no layer definitions; "
            "give the net definition (--model) to write a caffemodel"
        )
    for lw in ws.layers:
        blobs = [(b.data.reshape(b.shape), b.diff) for b in lw.blobs if b is not None]
        yield lw.param, blobs


# ---- HDF5 (Net::ToHDF5 / CopyTrainedLayersFromHDF5) ----------------------------------------


def is_hdf5(path) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


def read_h5(path) -> WeightSet:
    import h5py

    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or not isinstance(f["data"], h5py.Group):
                raise CaffeAlexError(f"{path}: not a Caffe HDF5 weights file (no 'data' group)")
            layers = [_h5_layer(name, group) for name, group in f["data"].items()]
    except OSError as exc:
        raise CaffeAlexError(f"{path}: cannot read HDF5 weights: {exc}") from None
    _note_doubles(path, layers)
    return WeightSet(layers, path, "h5")


def _h5_layer(name: str, group) -> LayerWeights:
    found = {int(k): group[k][()] for k in group if k.isdigit()}
    blobs: list[Blob | None] = [None] * (max(found) + 1 if found else 0)
    for index, array in found.items():
        array = np.asarray(array)
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float32)
        blobs[index] = Blob(array.reshape(-1), tuple(array.shape))
    return LayerWeights(name, blobs=blobs)


def write_h5(path, layers, with_diffs: bool = False) -> None:
    """``layers``: (name, [(data or None if shared, diff), ...]). Caffe's layout: a group per
    layer under data/ (owned blobs only) and, with diffs, under diff/ (every blob)."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            diff = f.create_group("diff") if with_diffs else None
            for name, blobs in layers:
                group = data.create_group(name)
                dgroup = diff.create_group(name) if with_diffs else None
                for index, (array, grad) in enumerate(blobs):
                    if array is not None:
                        group.create_dataset(str(index), data=_f32(array), track_times=False)
                    if dgroup is not None:
                        dgroup.create_dataset(str(index), data=_f32(grad), track_times=False)


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


# ---- .binaryproto mean files ----------------------------------------------------------------


def read_binaryproto(path) -> np.ndarray:
    """A BlobProto file (e.g. a mean image) as a float32 array of its stored shape."""
    path = os.fspath(path)
    buf, size = _map_file(path)
    try:
        blob = _parse_blob(buf, 0, size)
    except _WireError as exc:
        raise CaffeAlexError(
            f"{path}: not a BlobProto file: {exc.reason} at byte {exc.pos}"
        ) from None
    if size == 0 or blob.data.size == 0:
        raise CaffeAlexError(f"{path}: not a BlobProto file: it holds no data")
    return np.array(blob.data, dtype=np.float32).reshape(blob.shape)


def write_binaryproto(path, array) -> None:
    """As caffe.io.array_to_blobproto: a 4-D array uses num/channels/height/width (what older
    readers expect), any other rank the ``shape`` field."""
    array = np.asarray(array)
    if array.dtype != np.float32:
        log.info("%s: converting %s data to float32", path, array.dtype)
    head, tail = b"", b""  # fields go in number order: num..width (1-4), data (5), shape (7)
    if array.ndim == 4:
        legacy = caffe_pb2.BlobProto()
        legacy.num, legacy.channels, legacy.height, legacy.width = array.shape
        head = legacy.SerializeToString()
    else:
        tail = _length_delimited(7, caffe_pb2.BlobShape(dim=array.shape).SerializeToString())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for piece in [head, *_float_field(5, array), tail]:
            f.write(piece)


# ---- a Net's blobs in and out ---------------------------------------------------------------


@dataclass
class LoadReport:
    """What load_weights did: layers copied, file layers the net lacks (ignored, as Caffe
    does), and net layers with blobs that no file gave weights (they keep their fillers)."""

    files: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def read_weights(path) -> WeightSet:
    """Any weights file, by content (HDF5) or extension (.pt/.pth, .safetensors)."""
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith((".pt", ".pth", ".safetensors")):
        from .convert import read_torch_weights

        return read_torch_weights(path)
    if is_hdf5(path):
        return read_h5(path)
    return read_caffemodel(path)


def _legacy_match(target: tuple[int, ...], blob: Blob) -> bool:
    # Blob::ShapeEquals: legacy blobs were indexed from the end (a bias was 1x1x1xN), so a
    # num/channels/height/width blob matches when the net's shape, left-padded to 4-D, agrees.
    if not blob.legacy:
        return target == blob.shape
    return len(target) <= 4 and (1,) * (4 - len(target)) + target == blob.shape


def _net_file(net) -> str:
    return getattr(getattr(net, "source", None), "path", None) or "the net definition"


def _plan_copies(net, ws: WeightSet, plan: dict, report: LoadReport) -> None:
    """Check every layer of ``ws`` against the net (Caffe's CopyTrainedLayersFrom rules) and
    record the copies in ``plan`` (one per parameter object: shared blobs load once, the last
    layer giving one wins, as Caffe's repeated copies end)."""
    first = {}
    for i, name in enumerate(net.layer_names):
        first.setdefault(name, i)
    by_key = dict(zip(net.layers.keys(), net.layer_names)) if ws.format == "keyed" else None
    shared = {(p.layer, p.index) for p in net.param_infos if p.owner is not None}
    for lw in ws.layers:
        name = by_key.get(lw.name, lw.name) if by_key else lw.name
        if name not in first:
            log.info("Ignoring source layer %s", name)
            report.ignored.append(name)
            continue
        targets = list(net.layer(name).blobs)
        _check_count(name, lw, targets, ws, net, shared)
        for j, (param, blob) in enumerate(zip(targets, lw.blobs)):
            if blob is None:
                continue
            target = tuple(param.shape)
            if not _legacy_match(target, blob):
                raise CaffeAlexError(
                    f"cannot copy blob {j} of layer '{name}': shape {list(blob.shape)} in "
                    f"{ws.path} but {list(target)} in the net ({_net_file(net)}); to learn "
                    "this layer from scratch instead, rename it"
                )
            plan[id(param)] = (param, blob)
        if any(b is not None for b in lw.blobs):
            report.loaded.append(name)


def _check_count(name, lw: LayerWeights, targets, ws, net, shared) -> None:
    given = len(lw.blobs)
    # HDF5 files leave out blobs shared from another layer; every other blob must be there
    absent = [j for j, b in enumerate(lw.blobs) if b is None] + list(range(given, len(targets)))
    ok = given == len(targets)
    if ws.format == "h5":
        ok = given <= len(targets) and all((name, j) in shared for j in absent)
    if not ok:
        raise CaffeAlexError(
            f"incompatible number of blobs for layer '{name}': {given} in {ws.path}, "
            f"{len(targets)} in the net ({_net_file(net)})"
        )


def _copy(param, blob: Blob) -> None:
    import torch

    array = blob.data.reshape(tuple(param.shape))
    with torch.no_grad():
        if param.device.type == "cpu" and param.dtype in (torch.float32, torch.float64):
            np.copyto(param.detach().numpy(), array, casting="same_kind")
        else:
            param.copy_(torch.from_numpy(np.array(array, dtype=np.float32)))


def load_weights(net, paths) -> LoadReport:
    """Net.load_weights: copy the weights of each file in order (a comma-separated string or
    a list), by layer name, checking every shape before anything is copied from a file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in os.fspath(paths).split(",") if p]
    report, given = LoadReport(), set()
    for path in paths:
        ws = read_weights(path)
        plan: dict = {}
        _plan_copies(net, ws, plan, report)
        for param, blob in plan.values():
            _copy(param, blob)
        report.files.append(os.fspath(path))
        given.update(report.loaded)
        log.info("Copied weights of %d layers from %s", len(set(report.loaded)), path)
    with_blobs = [n for n in net.layer_names if len(net.layer(n).blobs)]
    report.missing = [n for n in with_blobs if n not in given]
    if report.missing:
        log.warning("Layers without weights in %s (fillers kept): %s", ",".join(report.files),
                    ", ".join(report.missing))  # fmt: skip
    return report


def net_layer_params(net) -> list[caffe_pb2.LayerParameter]:
    """The net's layer definitions as Caffe's Net keeps them: no blobs, phase set."""
    out = []
    for lp in net.net_param.layer:
        copy = caffe_pb2.LayerParameter()
        copy.CopyFrom(lp)
        copy.ClearField("blobs")
        if not copy.HasField("phase"):  # Net::Init gives each layer the net's phase
            copy.phase = caffe_pb2.Phase.Value(net.phase)
        out.append(copy)
    return out


def _array(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _grad(param) -> np.ndarray:
    return _array(param.grad) if param.grad is not None else np.zeros(param.shape, np.float32)


def save_weights(net, path, *, with_diffs: bool = False) -> None:
    """Net.save_weights: .caffemodel (Net::ToProto), .h5 (Net::ToHDF5), .pt or .safetensors."""
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith((".pt", ".pth", ".safetensors")):
        from .convert import save_net_torch

        return save_net_torch(net, path)
    layers = list(zip(net_layer_params(net), net.layer_names, net.layers.values()))
    if lower.endswith((".h5", ".hdf5")):
        owned = {(p.layer, p.index) for p in net.param_infos if p.owner is None}
        entries = [
            (
                name,
                [
                    (_array(p) if (name, j) in owned else None, _grad(p))
                    for j, p in enumerate(module.blobs)
                ],
            )  # fmt: skip
            for _, name, module in layers
        ]
        return write_h5(path, entries, with_diffs)
    pairs = (
        (lp, [(_array(p), _grad(p) if with_diffs else None) for p in module.blobs])
        for lp, _, module in layers
    )
    write_caffemodel(path, net.name, pairs)
