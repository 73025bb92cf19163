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

import json
import os
import re
from collections import OrderedDict

import numpy as np
import torch
from google.protobuf import text_format
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from ..errors import CaffeAlexError
from ..proto import caffe_pb2
from .caffemodel import net_layer_params
from .files import atomic_path
from .prototxt import to_text
from .weightset import Blob, LayerWeights, WeightSet, format_of, spec_owners

_KEY = re.compile(r"^layers\.(.+)\.blobs\.(\d+)$")
def module_keys(names) -> list[str]:
    """The module keys Net gives layers of these names, in order (see Net._module_key)."""
    probe, used, keys = nn.ModuleDict(), set(), []
    for name in names:
        base = name.replace(".", "_") or "_"
        key, n = base, 1
        while key in used or hasattr(probe, key):
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _net_text(name: str, layer_params) -> str:
    return to_text(caffe_pb2.NetParameter(name=name, layer=layer_params))


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
                torch.save({"state_dict": tensors, **meta}, f)  # must not be the temp name


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


def _load_torch_file(path):
    if format_of(path) == "safetensors":
        try:
            with safe_open(path, framework="np") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CaffeAlexError(f"{path}: not a readable safetensors file: {exc}") from None
        meta = {k: (v if k == "caffe_net" else json.loads(v)) for k, v in meta.items()
                if k.startswith("caffe_")}  # fmt: skip
        return tensors, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CaffeAlexError(f"no such file: {path}") from None
    except Exception as exc:  # pickle/zip errors of many kinds
        raise CaffeAlexError(f"{path}: not a readable PyTorch file: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k.startswith("caffe_")}
        obj = obj["state_dict"]
    else:
        meta = {}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CaffeAlexError(f"{path}: not a state dict of tensors")
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}, meta


def read_torch_weights(path) -> WeightSet:
    path = os.fspath(path)
    tensors, meta = _load_torch_file(path)
    for sharer, owner in meta.get("caffe_shared", {}).items():
        if sharer not in tensors and owner in tensors:
            tensors[sharer] = tensors[owner]
    blobs_map = meta.get("caffe_blobs")
    if blobs_map is None:  # a plain state dict: layers by module key, resolved by the net
        blobs_map = {k: [m.group(1), int(m.group(2))] for k in tensors if (m := _KEY.match(k))}
    layers: OrderedDict[str, LayerWeights] = OrderedDict()
    net_name = ""
    if meta.get("caffe_net"):
        net = text_format.Parse(meta["caffe_net"], caffe_pb2.NetParameter())
        net_name = net.name
        for lp in net.layer:
            layers.setdefault(lp.name, LayerWeights(lp.name, lp.type, [], lp))
    for key, (name, index) in blobs_map.items():
        lw = layers.setdefault(name, LayerWeights(name))
        lw.blobs.extend([None] * (index + 1 - len(lw.blobs)))
        array = np.asarray(tensors[key])
        lw.blobs[index] = Blob(array.reshape(-1), tuple(array.shape))
    kind = "keyed" if "caffe_blobs" not in meta else format_of(path)
    return WeightSet(list(layers.values()), path, kind, "current", net_name)
