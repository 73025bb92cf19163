"""The segmentation forks' public nets (tests/fork_nets/: SegNet-Tutorial, PSPNet, DeepLab v2
ResNet-101) build as published in both phases. Small forwards: DeepLab v2 single scale against
OpenCV 4; DeepLab v2 multi-scale, SegNet-basic (inference and train) and PSPNet's pyramid
pooling module layer by layer, each BN, Interp, Upsample and mask-making Pooling against NumPy
transcriptions of the forks (OpenCV has no BN or Upsample, nor Interp's shrink_factor). SegNet
basic trains two iterations as published (DenseImageData, class-weighted SoftmaxWithLoss) on a
small list of images written here.

The files' data layers read sources that are not here (caffe-segnet's DenseImageData lists,
DeepLab's HDF5 list): their tops get shapes with ``input_shapes``, as tests/test_corpus_build.py
gives them, and nothing in the files is replaced (see tests/fork_nets/SOURCES.md). Only the
OpenCV comparison removes what OpenCV cannot read (HDF5Data, SegAccuracy) from its copy.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from caffe_alex.formats.prototxt import parse_net_text
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from caffe_alex.solvers import Solver
from tests.layers.test_segmentation import caffe_interp2, caffe_max_pool, caffe_unpool
from tests.layers.test_segmentation_bn import pspnet_forward, segnet_learn
from tests.reference import opencv_forward, relative_error

FORK_NETS = Path(__file__).parent / "fork_nets"
FOLDERS = ("alexgkendall__SegNet-Tutorial", "hszhao__PSPNet", "isht7__pytorch-deeplab-resnet")
FILES = sorted(p for folder in FOLDERS for p in (FORK_NETS / folder).rglob("*.prototxt"))
SEGMENTATION_TYPES = {"BN", "Interp", "Upsample"}
DEEPLAB = FORK_NETS / "isht7__pytorch-deeplab-resnet" / "data"
MSC = DEEPLAB / "test_513.prototxt"


def layer_blocks(text: str) -> list[tuple[int, int, str]]:
    """(start, end, type) of each top-level ``layer { ... }`` block (comments, strings skipped)."""
    blocks, depth, start, i = [], 0, None, 0
    while i < len(text):
        ch = text[i]
        if ch == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if ch == '"':
            i = text.index('"', i + 1) + 1
            continue
        if ch == "{":
            if depth == 0:
                head = re.search(r"layers?\s*$", text[:i])
                start = head.start() if head else None
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and start is not None:
                kind = re.search(r'\btype:\s*"(\w+)"', text[start:i])
                blocks.append((start, i + 1, kind.group(1) if kind else ""))
                start = None
        i += 1
    return blocks


# A missing source's data layer: its param, and the image size its files were made for
# (CamVid's 360 x 480; DeepLab's 513 x 513 test crops, which keep its 8k + 1 alignment)
MISSING_SOURCES = {
    "DenseImageData": ("dense_image_data_param", (360, 480)),
    "HDF5Data": ("hdf5_data_param", (513, 513)),
}


def source_shapes(net_param, size: tuple[int, int] | None = None) -> dict[str, tuple]:
    """Shapes for the tops of data layers whose source is not here: their batch size and
    ``size`` (default: the one the file was made for); data N x 3 x H x W, the other tops
    N x 1 x H x W."""
    shapes = {}
    for layer in net_param.layer:
        if layer.type not in MISSING_SOURCES:
            continue
        param, default = MISSING_SOURCES[layer.type]
        batch = getattr(layer, param).batch_size
        for top in layer.top:
            shapes[top] = (batch, 3 if top == "data" else 1, *(size or default))
    return shapes


def build(path: Path, phase: str, size: tuple[int, int] | None = None) -> Net:
    net_param, source = parse_net_text(path.read_text(), str(path))
    return Net(net_param, phase, source=source, input_shapes=source_shapes(net_param, size))


def opencv_text(text: str) -> str:
    """The file as OpenCV can read it: HDF5Data becomes an Input of its data top, SegAccuracy
    (and so the label, which then nothing reads) is left out."""
    pieces, last = [], 0
    for start, end, kind in layer_blocks(text):
        if kind not in ("HDF5Data", "SegAccuracy"):
            continue
        pieces.append(text[last:start])
        last = end
        if kind == "HDF5Data":
            pieces.append('layer { name: "data" type: "Input" top: "data" ')
            pieces.append("input_param { shape { dim: 1 dim: 3 dim: 33 dim: 33 } } }\n")
    pieces.append(text[last:])
    return "".join(pieces)


@functools.lru_cache(maxsize=1)
def built_msc_test_net() -> Net:
    """DeepLab v2's multi-scale test net in TEST (its 21,000 lines take seconds to build): the
    build test and the forward test share it."""
    return build(DEEPLAB / "test_513.prototxt", "TEST")


def test_the_fetched_files_are_listed_in_sources():
    table = (FORK_NETS / "SOURCES.md").read_text()
    assert len(FILES) == 13
    for path in FILES:
        assert f"`{path.relative_to(FORK_NETS).as_posix()}`" in table, path


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(FORK_NETS).as_posix())
def test_every_file_builds_in_both_phases(path):
    built_types = set()
    for phase in ("TEST", "TRAIN"):
        net = built_msc_test_net() if (path, phase) == (MSC, "TEST") else build(path, phase)
        assert SEGMENTATION_TYPES & set(net.layer_types), path
        assert net.output_names
        built_types |= set(net.layer_types)
    # nothing left out: every type the file names is built (the fork-only data layers,
    # SegAccuracy and SoftmaxWithLoss with its class weighting too)
    assert {kind for _, _, kind in layer_blocks(path.read_text())} <= built_types


# ---- DeepLab v2 ResNet-101 ----------------------------------------------------------------


def randomize_resnet(net: Net, seed: int = 0) -> None:
    """Weights that keep a 101-layer net's activations in range: convolutions with variance
    1 / fan_in, BatchNorm statistics near (0, 1), Scale near (0.75, 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, blobs in net.params.items():
            kind = net.layer(name).type_name
            for i, blob in enumerate(blobs):
                noise = torch.randn(blob.shape, generator=gen)
                if kind == "Convolution" and i == 0:
                    blob.copy_(noise / np.sqrt(blob[0].numel()))
                elif kind == "BatchNorm":
                    value = [noise * 0.1, noise.abs() * 0.2 + 0.8, torch.ones(blob.shape)][i]
                    blob.copy_(value)
                elif kind == "Scale":
                    blob.copy_(noise * 0.1 + (0.75 if i == 0 else 0.0))
                else:
                    blob.copy_(noise * 0.1)


@pytest.mark.slow
def test_deeplab_v2_resnet101_single_scale_matches_opencv():
    # 33 x 33 keeps the net's 8k + 1 alignment: fc1_voc12 is 5 x 5, zoomed by 8 to 33 x 33.
    path = DEEPLAB / "test_Scale1.prototxt"
    net = build(path, "TEST", (33, 33))
    randomize_resnet(net)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1, 3, 33, 33)).astype(np.float32)
    label = rng.integers(0, 21, (1, 1, 33, 33)).astype(np.float32)
    label[:, :, :4] = 255  # SegAccuracy's ignore_label
    with torch.no_grad():
        ours = net(data=torch.from_numpy(data), label=torch.from_numpy(label))
    interp = net.blobs["fc1_interp"]  # read by SegAccuracy, so not an output
    assert tuple(interp.shape) == (1, 21, 33, 33)
    # the published SegAccuracy: pixel accuracy of the top class on the labelled pixels
    predicted = interp.argmax(1).numpy()[0]
    kept = label[0, 0] != 255
    pixel = (predicted[kept] == label[0, 0][kept]).mean()
    assert ours["fc1_accuracy"].shape == (1, 1, 1, 3)
    assert ours["fc1_accuracy"][0, 0, 0, 0].item() == pytest.approx(pixel, abs=1e-6)
    outputs = ["fc1_voc12", "fc1_interp"]
    theirs = opencv_forward(opencv_text(path.read_text()), net, {"data": data}, outputs)
    for name in outputs:
        reference = theirs[name]
        assert np.abs(reference).max() > 1e-2  # activations survived 101 layers
        assert relative_error(net.blobs[name].numpy(), reference) <= 1e-3, name


@pytest.mark.slow
def test_deeplab_v2_msc_interp_layers_follow_the_fork():
    # Three scales (shrink_factor 2; shrink 4 then zoom 3), fused after Interp back to the full
    # scale (zoom 2; shrink 3 then zoom 4): each Interp top against the fork's interp2.
    net = built_msc_test_net()  # its Input layers say 513 x 513: fed 33 x 33, it reshapes
    randomize_resnet(net, seed=1)
    seen = {}

    def keep(module, inputs, output):
        seen[module.name] = (inputs[0].detach().clone(), output.detach().clone())

    for name, kind in zip(net.layer_names, net.layer_types):
        if kind == "Interp":
            net.layer(name).register_forward_hook(keep)
    with torch.no_grad():
        net(data=torch.randn(1, 3, 33, 33), label=torch.zeros(1, 1, 33, 33))
    sizes = {name: tuple(out.shape[2:]) for name, (_, out) in seen.items()}
    assert sizes == {
        "data_res05": (17, 17),
        "data_res075": (25, 25),
        "fc1_voc12_res05_interp": (5, 5),
        "fc1_voc12_res075_interp": (5, 5),
        "fc1_interp": (33, 33),
    }
    for name, (bottom, top) in seen.items():
        flat = bottom.numpy().reshape(-1, *bottom.shape[2:])
        ref = caffe_interp2(flat, 0, *bottom.shape[2:], *top.shape[2:])
        assert np.array_equal(top.numpy(), ref.reshape(top.shape)), name


# ---- SegNet ---------------------------------------------------------------------------

SEGNET = FORK_NETS / "alexgkendall__SegNet-Tutorial" / "Models"


def record(net: Net, kinds) -> dict:
    """Each layer of ``kinds``: copies of its bottoms and tops as the forward saw them (before
    a later in-place layer overwrites them)."""
    seen = {}

    def keep(module, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        seen[module.name] = (
            [t.detach().clone() for t in inputs],
            [t.detach().clone() for t in outs],
        )

    for name, kind in zip(net.layer_names, net.layer_types):
        if kind in kinds:
            net.layer(name).register_forward_hook(keep)
    return seen


def check_pool_and_unpool(net: Net, seen: dict) -> None:
    """Every recorded MAX Pooling (values and mask) and Upsample against the transcriptions."""
    for name, kind in zip(net.layer_names, net.layer_types):
        if kind not in ("Pooling", "Upsample"):
            continue
        bottoms, tops = seen[name]
        if kind == "Pooling":
            top, mask = caffe_max_pool(bottoms[0].numpy(), 2, 2)
            assert np.array_equal(tops[0].numpy(), top), name
            assert np.array_equal(tops[1].numpy(), mask), name
        else:
            ref = caffe_unpool(bottoms[0].numpy(), bottoms[1].numpy(), *tops[0].shape[2:])
            assert np.array_equal(tops[0].numpy(), ref), name


def test_segnet_basic_inference_layer_by_layer():
    # 24 x 32 keeps the pooling chain and upsample4's pad_out_h consistent (24 -> 3 -> 2 -> 3).
    net = build(SEGNET / "segnet_basic_inference.prototxt", "TEST", (24, 32))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            for blob in blobs:
                blob.copy_(torch.randn(blob.shape, generator=gen) * 0.1)
    seen = record(net, {"BN", "Upsample", "Pooling"})
    with torch.no_grad():
        out = net(data=torch.randn(1, 3, 24, 32, generator=gen), label=torch.zeros(1, 1, 24, 32))
    assert tuple(out["prob"].shape) == (1, 11, 24, 32)
    for name, kind in zip(net.layer_names, net.layer_types):
        if kind == "BN":  # INFERENCE: x * scale + shift
            (bottom,), (top,) = seen[name]
            scale, shift = (b.detach().numpy() for b in net.params[name])
            np.testing.assert_allclose(top.numpy(), bottom.numpy() * scale + shift, rtol=1e-6)
    check_pool_and_unpool(net, seen)
    assert sum(kind == "Upsample" for kind in net.layer_types) == 4


@pytest.mark.slow
def test_segnet_basic_train_learn_mode_layer_by_layer():
    net = build(SEGNET / "segnet_basic_train.prototxt", "TRAIN", (24, 32))
    seen = record(net, {"BN", "Upsample", "Pooling"})
    gen = torch.Generator().manual_seed(1)
    # 11 is the loss's ignore_label, but the Accuracy layer has none: labels 0 to 10
    label = torch.randint(0, 11, (4, 1, 24, 32), generator=gen).float()
    net(data=torch.randn(4, 3, 24, 32, generator=gen), label=label)
    assert torch.isfinite(net.loss)
    net.loss.backward()
    for name, kind in zip(net.layer_names, net.layer_types):
        if kind == "BN":  # LEARN, the train nets' default mode: batch statistics
            (bottom,), (top,) = seen[name]
            scale, shift = (b.detach().numpy().astype(np.float64) for b in net.params[name])
            ref = segnet_learn(bottom.numpy().astype(np.float64), scale, shift)[0]
            np.testing.assert_allclose(top.numpy(), ref, rtol=1e-4, atol=1e-4)
            assert net.params[name][0].grad is not None
    check_pool_and_unpool(net, seen)


def test_segnet_basic_trains_as_published(tmp_path):
    # The published train net and the published solver's settings (Models/
    # segnet_basic_solver.prototxt: base_lr 0.1, momentum 0.9, weight_decay 0.0005, step policy
    # with gamma 1), for two iterations; only DenseImageData's source points at a list written
    # here: 24 x 32 images (the pooling chain and upsample4's pad_out_h need H / 8 odd) with
    # labels 0 to 10 (11, the loss's ignore_label, would stop the unweighted Accuracy layer).
    rng = np.random.default_rng(3)
    lines = []
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), rng.integers(0, 256, (24, 32, 3), np.uint8))
        cv2.imwrite(str(tmp_path / f"lab{i}.png"), rng.integers(0, 11, (24, 32), np.uint8))
        lines.append(f"{tmp_path}/img{i}.png {tmp_path}/lab{i}.png\n")
    (tmp_path / "train.txt").write_text("".join(lines))
    path = SEGNET / "segnet_basic_train.prototxt"
    net_param, _ = parse_net_text(path.read_text(), str(path))
    assert net_param.layer[0].type == "DenseImageData"
    net_param.layer[0].dense_image_data_param.source = str(tmp_path / "train.txt")
    solver_param = caffe_pb2.SolverParameter(
        test_initialization=False, test_iter=[1], test_interval=10000000, base_lr=0.1,
        lr_policy="step", gamma=1.0, stepsize=10000000, display=1, momentum=0.9, max_iter=2,
        weight_decay=0.0005, snapshot=0, snapshot_prefix=str(tmp_path / "segnet_basic"),
        solver_mode=caffe_pb2.SolverParameter.CPU, random_seed=1,
    )  # fmt: skip
    solver_param.net_param.CopyFrom(net_param)
    solver = Solver(solver_param)
    net = solver.train_net
    assert net.blob_shapes["data"] == (4, 3, 24, 32) and net.blob_shapes["label"] == (4, 1, 24, 32)
    weights = net.layer("loss").class_weights.tolist()
    assert weights == pytest.approx([0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446,
                                     1.8418, 0.6823, 6.2478, 7.3614])  # fmt: skip
    before = {name: [b.detach().clone() for b in blobs] for name, blobs in net.params.items()}
    losses = []
    solver.callbacks.append(lambda it, loss, *_: losses.append(float(loss)))
    solver.step(2)
    solver.close()
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not torch.equal(net.params["conv1"][0], before["conv1"][0])
    assert not torch.equal(net.params["conv_classifier"][0], before["conv_classifier"][0])


def test_bayesian_segnet_samples_at_test_time():
    net = build(SEGNET / "bayesian_segnet_basic_inference.prototxt", "TEST", (24, 32))
    feed = {"data": torch.randn(2, 3, 24, 32), "label": torch.zeros(2, 1, 24, 32)}
    with torch.no_grad():
        first, second = net(**feed)["prob"].clone(), net(**feed)["prob"]
    assert not torch.equal(first, second)  # sample_weights_test: dropout in TEST


# ---- PSPNet ---------------------------------------------------------------------------

PSPNET = FORK_NETS / "hszhao__PSPNet" / "evaluation" / "prototxt"


@pytest.mark.slow
def test_pspnet_pyramid_pooling_module_layer_by_layer():
    # The whole net runs at 473 x 473 only (its pooling kernels and Interp sizes are fixed):
    # here its pyramid pooling module, cut from the file as it stands, fed a 60 x 60 conv5_3.
    text = (PSPNET / "pspnet50_ADE20K_473.prototxt").read_text()
    blocks = layer_blocks(text)
    names = [re.search(r'name:\s*"([^"]+)"', text[s:e]).group(1) for s, e, _ in blocks]
    first, last = names.index("conv5_3_pool1"), names.index("conv5_3_concat")
    module = "".join(text[s:e] + "\n" for s, e, _ in blocks[first : last + 1])
    head = 'name: "ppm"\nlayer { name: "conv5_3" type: "Input" top: "conv5_3" '
    head += "input_param { shape { dim: 1 dim: 2048 dim: 60 dim: 60 } } }\n"
    net_param, source = parse_net_text(head + module)
    net = Net(net_param, "TEST", source=source)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, blobs in net.params.items():
            for i, blob in enumerate(blobs):
                noise = torch.randn(blob.shape, generator=gen)
                if net.layer(name).type_name == "Convolution":
                    blob.copy_(noise / np.sqrt(blob[0].numel()))
                else:  # BN: slope, bias, running mean, running variance (positive)
                    blob.copy_(noise.abs() + 0.5 if i == 3 else noise * 0.5)
    seen = record(net, {"BN", "Interp"})
    with torch.no_grad():
        out = net(conv5_3=torch.randn(1, 2048, 60, 60, generator=gen))
    assert tuple(out["conv5_3_concat"].shape) == (1, 4096, 60, 60)
    assert sorted(seen) == sorted(
        [f"conv5_3_pool{k}_conv/bn" for k in (1, 2, 3, 6)]
        + [f"conv5_3_pool{k}_interp" for k in (1, 2, 3, 6)]
    )
    for name, ((bottom,), (top,)) in seen.items():
        kind = net.layer(name).type_name
        if kind == "BN":  # frozen: the running statistics
            assert net.layer(name).frozen
            blobs = [b.detach().numpy().astype(np.float64).reshape(-1) for b in net.params[name]]
            layer = net.layer(name)
            ref = pspnet_forward(
                bottom.numpy().astype(np.float64), *blobs, layer.eps, layer.momentum, False
            )[0]
            np.testing.assert_allclose(top.numpy(), ref, rtol=1e-5, atol=1e-5)
        elif kind == "Interp":  # 1, 2, 3 and 6 pixels up to 60 x 60
            flat = bottom.numpy().reshape(-1, *bottom.shape[2:])
            ref = caffe_interp2(flat, 0, *bottom.shape[2:], 60, 60)
            assert np.array_equal(top.numpy(), ref.reshape(top.shape)), name
