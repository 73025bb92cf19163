"""PyTorch-side weight formats: ``.pt`` state dicts and ``.safetensors``, read and written.

Keys are the Net module's parameter names (``layers.<module key>.blobs.<i>``, as
``net.state_dict()``). Module keys sanitise Caffe names ('.' is not allowed in them), so each
file also records ``key -> [caffe layer name, blob index]``, the shared blobs, and the net's
layer definitions (protobuf text, without blobs), from which a caffemodel can be rewritten
without the prototxt. In a .pt file these sit beside the state dict:
``{"state_dict": ..., "caffe_blobs": ..., "caffe_shared": ..., "caffe_net": ...}``; in a
.safetensors file they are metadata (JSON / text), and shared blobs are stored once.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from collections import OrderedDict

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from ..errors import CaffeAlexError, describe
from ..proto import caffe_pb2
from .atomic import atomic_path
from .caffemodel import net_layer_params
from .file_errors import regular_file
from .prototxt import to_text
from .weightset import (
    Blob,
    LayerWeights,
    WeightSet,
    blob_lists,
    format_of,
    shown,
    spec_owners,
    text_of,
)
from .wire import length_delimited

_KEY = re.compile(r"^layers\.(.+)\.blobs\.([0-9]+)$")
def module_keys(names) -> list[str]:
    """The module keys Net gives layers of these names, in order (netparts.builder.module_key)."""
    probe, used, keys = nn.ModuleDict(), set(), []
    for name in names:
        base = shown(name).replace(".", "_") or "_"  # keys are UTF-8 (safetensors needs it)
        key, n = base, 1
        while key in used or hasattr(probe, key):
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _net_text(name: str, layer_params) -> str:
    net = caffe_pb2.NetParameter(layer=layer_params)
    if name:  # as bytes: a name read from a caffemodel may hold bytes that are not UTF-8
        net.MergeFromString(length_delimited(1, name.encode("utf-8", "surrogateescape")))
    return to_text(net)


# ---- writing ----------------------------------------------------------------------------------


def save_net_torch(net, path) -> None:
    """A Net's parameters as .pt or .safetensors, keyed like ``net.state_dict()``."""
    keys = list(net.layers.keys())
    key_of = {}
    for key, name in zip(keys, net.layer_names):
        key_of.setdefault(name, key)
    blobs = {
        f"layers.{key}.blobs.{j}": [name, j]
        for key, name, module in zip(keys, net.layer_names, net.layers.values())
        for j in range(len(module.blobs))
    }

    def key(layer: str, index: int) -> str:
        return f"layers.{key_of[layer]}.blobs.{index}"

    shared = {key(p.layer, p.index): key(*p.owner) for p in net.param_infos if p.owner}
    tensors = OrderedDict((k, v.detach().cpu()) for k, v in net.state_dict().items())
    text = _net_text(net.name, net_layer_params(net))
    _write_torch(path, tensors, blobs, shared, text)


def _write_torch(path, tensors, blobs, shared, net_text) -> None:
    meta = {"caffe_blobs": blobs, "caffe_shared": shared, "caffe_net": net_text}
    with atomic_path(path) as tmp:
        if format_of(path) == "safetensors":
            kept = {k: v.contiguous() for k, v in tensors.items() if k not in shared}
            text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
            data = _sorted_header(save_safetensors(kept, metadata={"format": "pt", **text}))
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "wb") as f:  # a file object: the archive's inner folder name
                try:  # must not be the temp name
                    torch.save({"state_dict": tensors, **meta}, f)
                except RuntimeError as exc:  # how torch's zip writer reports a failed write
                    raise OSError(describe(exc)) from None  # (atomic_path tells a full disk)


def _sorted_header(data: bytes) -> bytes:
    # safetensors writes its metadata in hash order, which changes from run to run: sort the
    # JSON header (same content, same length) so equal weights give byte-identical files
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > size:
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size :]


def weightset_to_torch(ws: WeightSet, path) -> None:
    keys = module_keys([lw.name for lw in ws.layers])
    tensors, blobs, shared = OrderedDict(), {}, {}
    owners = spec_owners(ws)
    for i, (key, lw) in enumerate(zip(keys, ws.layers)):
        for j, blob in enumerate(lw.blobs):
            k = f"layers.{key}.blobs.{j}"
            if blob is None:
                continue
            tensors[k] = torch.from_numpy(np.array(blob.data, np.float32).reshape(blob.shape))
            blobs[k] = [lw.name, j]
            if (i, j) in owners:
                oi, oj = owners[(i, j)]
                shared[k] = f"layers.{keys[oi]}.blobs.{oj}"
    text = _net_text(ws.net_name, [lw.param for lw in ws.layers]) if ws.has_definitions() else ""
    _write_torch(path, tensors, blobs, shared, text)


# ---- reading ----------------------------------------------------------------------------------
# Everything read from a file is checked before use: the metadata is the file's word only.


def _as_array(path: str, key: str, tensor) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise CaffeAlexError(f"{path}: '{shown(key)}' is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_complex():
        kind = "complex" if tensor.is_complex() else "quantized" if tensor.is_quantized else (
            str(tensor.layout).replace("torch.", ""))  # fmt: skip
        raise CaffeAlexError(f"{path}: tensor '{shown(key)}' is {kind}; weights are dense "
                             "arrays of real numbers")  # fmt: skip
    try:
        if tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # half, bfloat16, integers: as HDF5 files' are
        return tensor.detach().cpu().numpy()
    except (RuntimeError, TypeError, NotImplementedError) as exc:  # e.g. a "meta" tensor
        raise CaffeAlexError(f"{path}: tensor '{shown(key)}' has no readable data: "
                             f"{describe(exc)}") from None  # fmt: skip


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _unsafe(path: str, exc: Exception) -> CaffeAlexError:
    # torch's own text advises loading with weights_only=False, which runs the file's code:
    # never pass that on (caffe-alex never does it)
    found = _GLOBAL.search(str(exc))
    why = (f"it needs the Python object {found[1]}" if found
           else "it is not an archive of tensors")  # fmt: skip
    return CaffeAlexError(
        f"{path}: not a weights file caffe-alex can read safely ({why}; only tensors and plain "
        "containers are loaded, never other Python objects)"
    )


def _load_safetensors(path: str):
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: _as_array(path, k, f.get_tensor(k)) for k in f.keys()}
    except CaffeAlexError:
        raise
    except FileNotFoundError:
        raise CaffeAlexError(f"no such file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types
        raise CaffeAlexError(f"{path}: not a readable safetensors file: {describe(exc)}") from None
    found = {}
    for name in ("caffe_blobs", "caffe_shared"):  # JSON text; caffe_net is protobuf text
        if name in meta:
            try:
                found[name] = json.loads(meta[name])
            except ValueError:
                raise CaffeAlexError(f"{path}: metadata '{name}' is not JSON") from None
    if "caffe_net" in meta:
        found["caffe_net"] = meta["caffe_net"]
    return tensors, found


def _load_torch_file(path):
    """(tensors by key as numpy arrays, the caffe_* metadata as stored)."""
    if format_of(path) == "safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CaffeAlexError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise CaffeAlexError(f"is a folder, not a file: {path}") from None
    except pickle.UnpicklingError as exc:
        raise _unsafe(path, exc) from None
    except Exception as exc:  # zip, pickle and storage errors of many kinds
        if "weights_only" in str(exc):
            raise _unsafe(path, exc) from None
        raise CaffeAlexError(f"{path}: not a readable PyTorch file: {describe(exc)}") from None
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if isinstance(k, str) and k.startswith("caffe_")}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CaffeAlexError(f"{path}: not a state dict of tensors (names to tensors)")
    return {k: _as_array(path, k, v) for k, v in obj.items()}, meta


def _blob_ref(path: str, key, value) -> tuple[str, int]:
    if (
        isinstance(key, str)
        and isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    ):
        return value[0], value[1]
    raise CaffeAlexError(
        f"{path}: metadata 'caffe_blobs' maps '{shown(str(key))}' to {_short(value)}, "
        "not [layer name, blob index]"
    )


def _short(value) -> str:
    try:
        text = json.dumps(value, default=lambda v: type(v).__name__)
    except (ValueError, RecursionError):  # a number too long to print, or deep nesting
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _checked_meta(path: str, meta: dict, tensors: dict):
    """(caffe_blobs as {key: (layer, index)} or None, caffe_net text), after checking their
    types and filling in the blobs caffe_shared says are stored once."""
    shared = meta.get("caffe_shared", {})
    if not isinstance(shared, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in shared.items()
    ):
        raise CaffeAlexError(f"{path}: metadata 'caffe_shared' is not a map of tensor names")
    for sharer, owner in shared.items():
        if sharer not in tensors and owner in tensors:
            tensors[sharer] = tensors[owner]
    blobs_map = meta.get("caffe_blobs")
    if blobs_map is not None:
        if not isinstance(blobs_map, dict):
            raise CaffeAlexError(f"{path}: metadata 'caffe_blobs' is not a map")
        blobs_map = {k: _blob_ref(path, k, v) for k, v in blobs_map.items()}
        for key in blobs_map:
            if key not in tensors:
                raise CaffeAlexError(f"{path}: metadata 'caffe_blobs' names tensor "
                                     f"'{shown(key)}', which the file does not hold")  # fmt: skip
    text = meta.get("caffe_net")
    text = "" if text is None else text  # "": no layer definitions (written from an HDF5 file)
    if not isinstance(text, str):
        raise CaffeAlexError(f"{path}: metadata 'caffe_net' is not text")
    return blobs_map, text


def _parse_net_text(path: str, text: str) -> caffe_pb2.NetParameter:
    try:
        return text_format.Parse(text, caffe_pb2.NetParameter())
    except text_format.ParseError as exc:
        first = exc  # perhaps only a name that is not UTF-8 (escaped in the text): try bytes
    except Exception as exc:  # a parser meeting damaged text
        first = exc
    if isinstance(first, text_format.ParseError):
        try:
            twin = text_format.Parse(text, _bytes_twin()())
            return caffe_pb2.NetParameter.FromString(twin.SerializeToString())
        except Exception:  # the first parse's reason names caffe's own message types
            pass
    raise CaffeAlexError(
        f"{path}: metadata 'caffe_net' is not a net definition: {describe(first)}"
    )


@functools.cache
def _bytes_twin():
    """NetParameter with every string field declared bytes (the same wire format): protobuf
    text holding names that are not UTF-8 (as Caffe's files may) parses into it, then into a
    NetParameter through the binary form, keeping the bytes."""
    fdp = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name, fdp.package = "caffe_alex_bytes_twin.proto", "caffe_alex_bytes_twin"

    def retype(message):
        for f in message.field:
            if f.type == f.TYPE_STRING:
                f.type = f.TYPE_BYTES
            if f.type_name.startswith(".caffe."):
                f.type_name = ".caffe_alex_bytes_twin." + f.type_name[len(".caffe.") :]
        for nested in message.nested_type:
            retype(nested)

    for message in fdp.message_type:
        retype(message)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("caffe_alex_bytes_twin.NetParameter")
    )


def _index(digits: str) -> int:
    # Python refuses to convert 4300 digits or more; any such index is refused by blob_lists
    return int(digits) if len(digits) < 4000 else 10**4000


def read_torch_weights(path) -> WeightSet:
    path = regular_file(path)
    tensors, meta = _load_torch_file(path)
    blobs_map, text = _checked_meta(path, meta, tensors)
    if blobs_map is None:  # a plain state dict: layers by module key, resolved by the net
        blobs_map = {k: (m[1], _index(m[2])) for k in tensors if (m := _KEY.match(k))}
        if tensors and not blobs_map:
            raise CaffeAlexError(f"{path}: no tensor is named as a net's parameters "
                                 "(layers.<layer>.blobs.<index>)")  # fmt: skip
    layers: OrderedDict[str, LayerWeights] = OrderedDict()
    net_name = ""
    if text:
        net = _parse_net_text(path, text)
        net_name = text_of(net.name)
        for lp in net.layer:
            name = text_of(lp.name)
            layers.setdefault(name, LayerWeights(name, text_of(lp.type), [], lp))
    found: dict[str, dict[int, Blob]] = {}
    for key, (name, index) in blobs_map.items():
        array = np.asarray(tensors[key])
        found.setdefault(name, {})[index] = Blob(array.reshape(-1), tuple(array.shape))
    for name, blobs in blob_lists(path, found).items():
        layers.setdefault(name, LayerWeights(name)).blobs = blobs
    kind = "keyed" if "caffe_blobs" not in meta else format_of(path)
    return WeightSet(list(layers.values()), path, kind, "current", net_name)
