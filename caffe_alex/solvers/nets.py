"""The solver's nets (Caffe's Solver::InitTrainNet / InitTestNets / ShareTrainedLayersWith).

The train net comes from exactly one of net, net_param, train_net, train_net_param; test nets
from test_net_param, then test_net, then as many copies of the generic net (net/net_param) as
test_iter has entries left. Each net's state is {phase} merged with the net file's own state,
then with train_state / test_state[i]. Inline nets in the old V0/V1 format are upgraded here
(Caffe leaves them as they are and would fail to build them); net files are upgraded when read.
``apply_speed_options`` converts built nets to channels_last and compiles them (off by default:
both may change the last bits of Caffe's float32 numbers).
"""

from __future__ import annotations

import torch

from ..errors import CaffeAlexError, SourceMap
from ..formats.prototxt import read_net
from ..formats.upgrade import net_needs_upgrade, upgrade_net
from ..log import get_logger
from ..net import Net
from ..proto import caffe_pb2

log = get_logger()


def _inline(net_param, field: str, source_path):
    if net_needs_upgrade(net_param):
        log.info("Upgrading the solver's inline %s from a deprecated format", field)
        net_param = upgrade_net(net_param, f"{source_path or 'solver'} ({field})")
    return net_param, SourceMap(path=source_path)


def _net_state(net_param, phase: str, override: caffe_pb2.NetState | None):
    """(phase, level, stages) to hand to Net, which itself adds the file's own state under
    them (the net's stages come first, then these)."""
    state = caffe_pb2.NetState(phase=caffe_pb2.Phase.Value(phase))
    state.MergeFrom(net_param.state)
    if override is not None:
        state.MergeFrom(override)
    stages = list(override.stage) if override is not None else []
    return caffe_pb2.Phase.Name(state.phase), state.level, stages


def _build(net_param, source, phase, override, device, splits=False) -> Net:
    phase, level, stages = _net_state(net_param, phase, override)
    net = Net(net_param, phase, level=level, stages=stages, source=source, insert_splits=splits)
    return net.to(device) if device is not None else net


def build_train_net(param, source_path, device, splits: bool = False) -> Net:
    given = [f for f in ("net", "net_param", "train_net", "train_net_param") if param.HasField(f)]
    if len(given) != 1:
        raise CaffeAlexError(
            "the solver must specify exactly one train net among net, net_param, train_net, "
            f"train_net_param (it gives {', '.join(given) or 'none'})"
        )
    field = given[0]
    if field.endswith("_param"):
        log.info("Creating training net specified in %s.", field)
        net_param, source = _inline(getattr(param, field), field, source_path)
    else:
        log.info("Creating training net from %s file: %s", field, getattr(param, field))
        net_param, source = read_net(getattr(param, field))
    return _build(net_param, source, "TRAIN", param.train_state, device, splits)


def build_test_nets(param, source_path, device, splits: bool = False) -> list[Net]:
    if param.HasField("net") and param.HasField("net_param"):
        raise CaffeAlexError("the solver may not specify both net and net_param")
    specific = len(param.test_net_param) + len(param.test_net)
    generic = param.HasField("net") or param.HasField("net_param")
    if (len(param.test_iter) < specific) if generic else (len(param.test_iter) != specific):
        raise CaffeAlexError(
            f"test_iter must be given once per test net ({specific} test net(s) specified, "
            f"{len(param.test_iter)} test_iter)"
        )
    count = specific + (len(param.test_iter) - specific if generic else 0)
    if param.test_state and len(param.test_state) != count:
        raise CaffeAlexError(
            f"test_state must be unspecified or given once per test net ({count} test nets, "
            f"{len(param.test_state)} test_state)"
        )
    if count and param.test_interval <= 0:
        raise CaffeAlexError(f"test_interval must be > 0 when there are test nets ({count})")
    specs = [(p, "test_net_param", None) for p in param.test_net_param]
    specs += [(None, "test_net file", path) for path in param.test_net]
    while len(specs) < count:
        specs.append((param.net_param, "net_param", None) if param.HasField("net_param")
                     else (None, "net file", param.net))  # fmt: skip
    nets = []
    for i, (inline, what, path) in enumerate(specs):
        log.info("Creating test net (#%d) specified by %s", i, f"{what}: {path}" if path else what)
        if path is None:
            net_param, source = _inline(inline, what, source_path)
        else:
            net_param, source = read_net(path)
        override = param.test_state[i] if param.test_state else None
        nets.append(_build(net_param, source, "TEST", override, device, splits))
    return nets


def load_initial_weights(train_net: Net, test_nets: list[Net], lists) -> None:
    """The solver's ``weights`` (comma-separated lists of files): into the train net, and into
    a test net that has learnable layers the train net lacks."""
    paths = [p.strip() for item in lists for p in item.split(",") if p.strip()]
    if not paths:
        return
    for path in paths:
        log.info("Finetuning from %s", path)
    train_net.load_weights(paths)
    train_layers = set(train_net.layer_names)
    for net in test_nets:  # layers only a test net has get the weights too
        if any(len(net.layer(n).blobs) and n not in train_layers for n in net.layer_names):
            net.load_weights(paths)


def share_trained_layers(test_net: Net, train_net: Net) -> None:
    """Give each test-net layer named like a train-net layer that layer's blob objects (weights
    and statistics such as BatchNorm's), so the test net always sees the trained values."""
    for name in dict.fromkeys(train_net.layer_names):
        if name not in test_net.layer_names:
            continue
        source, target = train_net.layer(name).blobs, test_net.layer(name).blobs
        if len(source) != len(target):
            raise CaffeAlexError(
                f"cannot share layer '{name}' with the test net: {len(source)} blobs in the "
                f"train net, {len(target)} in the test net"
            )
        for i, blob in enumerate(source):
            if tuple(blob.shape) != tuple(target[i].shape):
                raise CaffeAlexError(
                    f"cannot share blob {i} of layer '{name}' with the test net: shape "
                    f"{list(blob.shape)} in the train net, {list(target[i].shape)} in the test net"
                )
            target[i] = blob
    for info in test_net.param_infos:
        info.param = test_net.layer(info.layer).blobs[info.index]


def seed_rank(param, rank: int, device) -> None:
    """A seeded run repeats: torch's generator (fillers, dropout masks) seeded apart for each
    rank, random_seed + rank as Caffe seeds them, and cuDNN's fixed algorithms."""
    if param.random_seed < 0:
        return
    torch.manual_seed(param.random_seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def build_solver_nets(param, source_path, device, splits, is_root, weights) -> tuple:
    """(train net, test nets): the test nets (rank 0's alone) share the train net's trained
    layers; rank 0 loads the initial ``weights`` (param.weights, then the given files)."""
    train_net = build_train_net(param, source_path, device, splits)
    # Only rank 0 tests (as Caffe), so the other ranks need neither test nets nor test data
    test_nets = build_test_nets(param, source_path, device, splits) if is_root else []
    for net in test_nets:
        share_trained_layers(net, train_net)
    if is_root:  # the other ranks receive rank 0's weights
        load_initial_weights(train_net, test_nets, list(param.weights) + list(weights or []))
    return train_net, test_nets


def apply_speed_options(nets, channels_last: bool = False, compile=False) -> None:
    """channels_last: 4-D parameters (convolution kernels) in NHWC memory order, which cuDNN's
    tensor-core kernels prefer (the solver converts 4-D inputs to match); shared parameters
    stay shared, since Module.to replaces their data in place. compile: torch.compile each
    net's forward (True: the default backend, inductor; or a backend name)."""
    for net in nets:
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if compile:
            net.compile(**({} if compile is True else {"backend": compile}))
