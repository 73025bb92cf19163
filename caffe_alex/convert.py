"""PyTorch-side weight formats (.pt state dicts, .safetensors), .npy mean files, and
``caffe-alex convert`` between them and Caffe's formats.

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

from .errors import CaffeAlexError
from .proto import caffe_pb2
from .weights import (
    Blob,
    LayerWeights,
    WeightSet,
    atomic_path,
    load_weights,
    net_layer_params,
    read_binaryproto,
    read_weights,
    save_weights,
    weightset_layers,
    write_binaryproto,
    write_caffemodel,
    write_h5,
)

_KEY = re.compile(r"^layers\.(.+)\.blobs\.(\d+)$")
FORMATS = {
    ".caffemodel": "caffemodel",
    ".h5": "h5",
    ".hdf5": "h5",
    ".pt": "pt",
    ".pth": "pt",
    ".safetensors": "safetensors",
    ".binaryproto": "binaryproto",
    ".npy": "npy",
}


def format_of(path) -> str:
    lower = os.fspath(path).lower()
    for ext, kind in FORMATS.items():
        if lower.endswith(ext):
            return kind
    known = ", ".join(FORMATS)
    raise CaffeAlexError(f"{os.fspath(path)}: unknown weights format (extensions: {known})")


def module_keys(names) -> list[str]:
    """The module keys Net gives layers of these names, in order (see Net._module_key)."""
    from torch import nn

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
    from .prototxt import to_text

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
    import torch

    meta = {"caffe_blobs": blobs, "caffe_shared": shared, "caffe_net": net_text}
    with atomic_path(path) as tmp:
        if format_of(path) == "safetensors":
            from safetensors.torch import save

            kept = {k: v.contiguous() for k, v in tensors.items() if k not in shared}
            text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
            data = _sorted_header(save(kept, metadata={"format": "pt", **text}))
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


def _specs_owners(ws: WeightSet) -> dict[tuple[int, int], tuple[int, int]]:
    """(layer position, blob) -> owner's, from ParamSpec names (first use owns, as Caffe)."""
    owners, first = {}, {}
    for i, lw in enumerate(ws.layers):
        for j, spec in enumerate(lw.param.param if lw.param is not None else []):
            if spec.name and j < len(lw.blobs):
                if spec.name in first:
                    owners[(i, j)] = first[spec.name]
                else:
                    first[spec.name] = (i, j)
    return owners


def weightset_to_torch(ws: WeightSet, path) -> None:
    import torch

    keys = module_keys([lw.name for lw in ws.layers])
    tensors, blobs, shared = OrderedDict(), {}, {}
    owners = _specs_owners(ws)
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
        from safetensors import safe_open

        try:
            with safe_open(path, framework="np") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CaffeAlexError(f"{path}: not a readable safetensors file: {exc}") from None
        meta = {k: (v if k == "caffe_net" else json.loads(v)) for k, v in meta.items()
                if k.startswith("caffe_")}  # fmt: skip
        return tensors, meta
    import torch

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
        from google.protobuf import text_format

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


# ---- convert ----------------------------------------------------------------------------------


def write_weightset(ws: WeightSet, dst, *, with_diffs: bool = False) -> None:
    kind = format_of(dst)
    if kind in ("pt", "safetensors"):
        return weightset_to_torch(ws, dst)
    if any(b is None for lw in ws.layers for b in lw.blobs) and kind == "caffemodel":
        raise CaffeAlexError(f"{ws.path}: some blobs are stored once for shared parameters; "
                             "give the net definition (--model) to write a caffemodel")  # fmt: skip
    if kind == "caffemodel":
        layers = weightset_layers(ws)
        if not with_diffs:
            layers = ((lp, [(d, None) for d, _ in blobs]) for lp, blobs in layers)
        return write_caffemodel(dst, ws.net_name, layers)
    if kind == "h5":
        owners = _specs_owners(ws)
        entries = [
            (
                lw.name,
                [
                    (None if b is None or (i, j) in owners else b.data.reshape(b.shape), None)
                    for j, b in enumerate(lw.blobs)
                ],
            )  # fmt: skip
            for i, lw in enumerate(ws.layers)
        ]
        return write_h5(dst, entries)
    raise CaffeAlexError(f"cannot convert weights to a .{kind} file")


def convert(src, dst, *, model=None, phase="TEST", with_diffs=False, input_shapes=None) -> str:
    """Convert ``src`` to ``dst`` (formats by extension); returns a one-line summary.

    With ``model``, the weights go through a Net built from it (shapes checked, the net's
    layer definitions written); without, straight from file to file where the target format
    does not need the definitions.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    kinds = format_of(src), format_of(dst)
    if "binaryproto" in kinds or "npy" in kinds:
        return _convert_mean(src, dst, kinds)
    if model:
        from .net import Net

        net = Net.from_prototxt(model, phase.upper(), input_shapes=input_shapes)
        report = load_weights(net, [src])
        save_weights(net, dst, with_diffs=with_diffs)
        return f"{dst}: {len(report.loaded)} layers from {src} through {model}"
    ws = read_weights(src)
    write_weightset(ws, dst, with_diffs=with_diffs)
    return f"{dst}: {len(ws.layers)} layers from {src}"


def _convert_mean(src, dst, kinds) -> str:
    if kinds == ("binaryproto", "npy"):
        array = read_binaryproto(src)
        with atomic_path(dst) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    elif kinds == ("npy", "binaryproto"):
        try:
            array = np.load(src, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CaffeAlexError(f"{src}: not a readable .npy file: {exc}") from None
        write_binaryproto(dst, array)
    else:
        raise CaffeAlexError("mean files convert between .binaryproto and .npy only")
    return f"{dst}: array of shape {list(array.shape)} from {src}"
