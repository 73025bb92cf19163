"""The mobile and classification fork nets under tests/fork_nets/ (ShuffleNet, MobileNets with
ConvolutionDepthwise and DepthwiseConvolution, SE-ResNet-50, YOLOv2 and Tiny-YOLO ports, SSDLite)
build in both phases, and each whole net matches OpenCV 4 blob by blob on random weights (to
1e-3 of each blob's largest |value|) where OpenCV runs every layer: under another type name
(DepthwiseConvolution is its Convolution), with Axpy's data bottoms swapped (OpenCV reads them
the other way round), and with the port's Region compared through OpenCV's decoding.

Files in tests/test_fork_nets_pending.txt wait for layer types of other families: they must
still fail, on an unknown layer type, until they are moved out of that list."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.whole_net import compare_net_with_opencv
from tests.yolo_reference import decoded_like_opencv, opencv_region_text, region_anchor_model

FORK_NETS = Path(__file__).parent / "fork_nets"
OWNERS = [
    "chuanqi305__MobileNetv2-SSDLite",
    "farmingyard__ShuffleNet",
    "farmingyard__caffe-mobilenet",
    "gklz1982__caffe-yolov2",
    "hujie-frank__SENet",
    "lwplw__caffe_yolov2",
    "yonghenglh6__DepthwiseConvolution",
]


def pending() -> dict[str, str]:
    lines = (Path(__file__).parent / "test_fork_nets_pending.txt").read_text().splitlines()
    entries = [line.split(" # ", 1) for line in lines if line.strip() and line[0] != "#"]
    return {path.strip(): why.strip() for path, why in entries}


def mobile_nets() -> list[str]:
    files = [p for owner in OWNERS for p in (FORK_NETS / owner).rglob("*.prototxt")]
    return sorted(str(p.relative_to(FORK_NETS)) for p in files)


def test_every_owner_folder_has_nets_and_sources_rows():
    sources = (FORK_NETS / "SOURCES.md").read_text()
    for rel in mobile_nets():
        assert f"`{rel}`" in sources, f"{rel} has no row in tests/fork_nets/SOURCES.md"
    assert {rel.split("/")[0] for rel in mobile_nets()} == set(OWNERS)
    assert set(pending()) <= set(mobile_nets())


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("rel", mobile_nets())
def test_fork_net_builds(rel, phase):
    path = str(FORK_NETS / rel)
    if rel in pending():
        with pytest.raises(CaffeAlexError, match="unknown layer type"):
            Net.from_prototxt(path, phase)
        return
    net = Net.from_prototxt(path, phase)
    assert net.layer_names and net.output_names
    assert all(d > 0 for shape in net.blob_shapes.values() for d in shape)


def edited(rel: str, change) -> str:
    """The file's net with ``change(layer)`` applied to each layer, as prototxt text."""
    net = text_format.Parse((FORK_NETS / rel).read_text(), caffe_pb2.NetParameter())
    for layer in net.layer:
        change(layer)
    return text_format.MessageToString(net)


def swap_axpy_data(layer) -> None:
    if layer.type == "Axpy":
        a, x, y = layer.bottom
        layer.ClearField("bottom")
        layer.bottom.extend([a, y, x])


def depthwise_as_convolution(layer) -> None:
    if layer.type == "DepthwiseConvolution":
        layer.type = "Convolution"


@pytest.mark.slow
@pytest.mark.parametrize(
    "rel",
    [
        "farmingyard__ShuffleNet/shufflenet_1x_g3_deploy.prototxt",
        "farmingyard__ShuffleNet/shufflenet_v2_1x_deploy.prototxt",
        "farmingyard__caffe-mobilenet/mobilenet_1by2_deploy.prototxt",
    ],
)
def test_whole_net_matches_opencv(rel):
    _, _, _, errors = compare_net_with_opencv(str(FORK_NETS / rel))
    assert len(errors) >= 25


@pytest.mark.slow
def test_depthwise_convolution_mobilenet_matches_opencv_convolution():
    rel = "yonghenglh6__DepthwiseConvolution/example/depthwised_mobilenet_deploy.prototxt"
    text = edited(rel, depthwise_as_convolution)
    net, *_ = compare_net_with_opencv(str(FORK_NETS / rel), opencv_text=text)
    assert net.layer_types.count("DepthwiseConvolution") == 13


@pytest.mark.slow
def test_se_resnet_50_matches_opencv_with_axpy_bottoms_swapped():
    rel = "hujie-frank__SENet/models/SE-ResNet-50.prototxt"
    net, _, _, errors = compare_net_with_opencv(
        str(FORK_NETS / rel), opencv_text=edited(rel, swap_axpy_data)
    )
    axpy = [s.tops[0] for s in net.steps if net.layer(s.layer).type_name == "Axpy"]
    assert len(axpy) == 16 and set(axpy) <= set(errors)  # each compared (after its ReLU)


@pytest.mark.slow
def test_yolov2_with_reorg_matches_opencv():
    # 64 x 64 keeps every layer (the reorg's bottom is 4 x 4, the grid 2 x 2) at a fraction of
    # the cost of 416 x 416.
    rel = "gklz1982__caffe-yolov2/examples/indoor/eval_detection/deploy.prototxt"
    net, _, _, errors = compare_net_with_opencv(
        str(FORK_NETS / rel), input_shapes={"data": (1, 3, 64, 64)}
    )
    assert net.blob_shapes["reorg1"] == (1, 2048, 2, 2) and "reorg1" in errors


@pytest.mark.slow
def test_tiny_yolo_with_region_matches_opencv_region():
    rel = "lwplw__caffe_yolov2/examples/yolov2/yolov2_tiny_3.prototxt"
    text = (FORK_NETS / rel).read_text()
    region = re.search(r'name: "(\w+)"\s+type: "Region"', text)[1]
    anchors = np.array([1.08, 1.19, 3.42, 4.41, 6.63, 11.38, 9.42, 5.11, 16.62, 10.52])
    net, ours, theirs, errors = compare_net_with_opencv(
        str(FORK_NETS / rel),
        opencv_text=opencv_region_text(text, 5),
        input_shapes={"data": (1, 3, 160, 160)},
        extra_model=region_anchor_model(region, anchors),
        expect={"region1": lambda top: decoded_like_opencv(top, 5, anchors)},
    )
    assert ours["region1"].shape == (1, 40, 6, 6) and "region1" in errors
