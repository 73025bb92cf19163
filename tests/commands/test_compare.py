"""caffe-alex compare: real nets with random weights written as .caffemodel files agree with
OpenCV's dnn module within 1e-4 blob by blob; one changed weight is found and named; layers
OpenCV cannot run cut the comparison short; bad input is one line.

The open_nsfw net is Yahoo's real deploy prototxt (a ResNet-50 at half width, stored under
tests/fork_nets) with random weights: its trained .caffemodel is not in the snapshot the
tests can use. One 300 x 400 image, resized to 256 x 256 and centre cropped, as deploy
does."""

from __future__ import annotations

import re
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.net import Net
from tests.corpus import CORPUS
from tests.paths import ROOT
from tests.reference import fan_in_weights

ALEXNET = ROOT / "models" / "bvlc_alexnet" / "deploy.prototxt"
GOOGLENET = CORPUS / "BVLC__caffe" / "models" / "bvlc_googlenet" / "deploy.prototxt"
OPEN_NSFW = ROOT / "tests" / "fork_nets" / "yahoo__open_nsfw" / "nsfw_model" / "deploy.prototxt"
_ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\d+(?:x\d+)*)\s+(\S+)\s+(\S+)\s+(ok|DIFFERS)")


def run(*args):
    return CliRunner().invoke(main, ["compare", *map(str, args)])


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A smooth colour image: no two channels alike, so a wrong channel order would show."""
    path = tmp_path_factory.mktemp("images") / "picture.jpg"
    y, x = np.mgrid[0:300, 0:400]
    pixels = np.stack([(x * 0.6) % 256, (y * 0.8) % 256, ((x + y) * 0.3) % 256], -1)
    assert cv2.imwrite(str(path), pixels.astype(np.uint8))
    return path


def random_caffemodel(prototxt, path, seed: int = 0) -> Net:
    net = Net.from_prototxt(str(prototxt), "TEST")
    fan_in_weights(net, seed)
    net.save_weights(str(path))
    return net


def rows(output: str) -> dict[str, tuple[str, float, float, str]]:
    """blob -> (layer, max |diff|, relative, verdict) from the printed table."""
    found = {}
    for line in output.splitlines():
        match = _ROW.match(line)
        if match:
            blob, layer, _, diff, rel, verdict = match.groups()
            found[blob] = (layer, float(diff), float(rel), verdict)
    return found


def check_agreement(prototxt, weights, image, expected_blobs: int):
    result = run("--model", prototxt, "--weights", weights, "--mean-values", "104,117,123", image)
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert len(table) == expected_blobs
    assert max(rel for _, _, rel, _ in table.values()) <= 1e-4
    assert "top-1 agreement on 'prob': 1/1 images; top-5: 1/1" in result.stdout
    assert f"all {expected_blobs} compared blobs agree within 0.0001" in result.stdout
    assert "not compared" not in result.stdout
    return table


@pytest.mark.slow
def test_alexnet_agrees_with_opencv(tmp_path, image):
    random_caffemodel(ALEXNET, tmp_path / "alexnet.caffemodel")
    table = check_agreement(ALEXNET, tmp_path / "alexnet.caffemodel", image, 14)
    # a blob written in place is compared after its last writer (the ReLU, the Dropout)
    assert table["conv1"][0] == "relu1" and table["fc6"][0] == "drop6"


@pytest.mark.corpus
def test_googlenet_agrees_with_opencv(tmp_path, image):
    net = random_caffemodel(GOOGLENET, tmp_path / "googlenet.caffemodel")
    table = check_agreement(GOOGLENET, tmp_path / "googlenet.caffemodel", image, 84)
    # the inputs of the Concat layers too (OpenCV's fusion would overwrite them)
    assert table["inception_3a/1x1"][2] <= 1e-4
    assert set(table) == {b for b in net.blob_shapes if b != "data"}


@pytest.mark.slow
def test_open_nsfw_resnet50_agrees_with_opencv(tmp_path, image):
    random_caffemodel(OPEN_NSFW, tmp_path / "nsfw.caffemodel")
    table = check_agreement(OPEN_NSFW, tmp_path / "nsfw.caffemodel", image, 73)
    assert table["conv_1"][0] == "relu_1"  # after its BatchNorm, Scale and ReLU in place
    assert table["prob"][1] > 0 or table["fc_nsfw"][1] > 0  # not a saturated softmax


@pytest.mark.slow
def test_one_changed_weight_is_found_and_named(tmp_path, image):
    right, wrong = tmp_path / "right.caffemodel", tmp_path / "wrong.caffemodel"
    net = random_caffemodel(OPEN_NSFW, right)
    weight = net.params["conv_stage1_block0_branch2b"][0]
    with __import__("torch").no_grad():
        weight[3, 5, 1, 1] += 1.0
    net.save_weights(str(wrong))
    result = run("--model", OPEN_NSFW, "--weights", wrong, "--opencv-weights", right,
                 "--mean-values", "104,117,123", image)  # fmt: skip
    assert result.exit_code == 1, result.output
    table = rows(result.stdout)
    verdicts = [v for _, _, _, v in table.values()]
    first = verdicts.index("DIFFERS")
    assert list(table)[first] == "conv_stage1_block0_branch2b"
    assert all(v == "ok" for v in verdicts[:first])
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "caffe-alex: error: blob 'conv_stage1_block0_branch2b' (layer "
        "'relu_stage1_block0_branch2b') differs from OpenCV's: relative difference"
    )


TAIL_NET = """name: "tail"
layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ dim: 1 dim: 3 dim: 16 dim: 16 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
{tail}
layer {{ name: "fc" type: "InnerProduct" bottom: "odd" top: "fc"
  inner_product_param {{ num_output: 5 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""


@pytest.mark.parametrize(
    "tail, kind",
    [
        # a type OpenCV does not know: its error names the layer
        ('layer { name: "odd" type: "Threshold" bottom: "pool" top: "odd" }', "Threshold"),
        # a type it knows but refuses as written: found by bisection
        ('layer { name: "odd" type: "Tile" bottom: "pool" top: "odd" tile_param { tiles: 2 } }',
         "Tile"),
    ],
)  # fmt: skip
def test_a_layer_opencv_cannot_run_cuts_the_comparison(tmp_path, image, tail, kind):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(TAIL_NET.format(tail=tail))
    random_caffemodel(prototxt, tmp_path / "net.caffemodel")
    result = run("--model", prototxt, "--weights", tmp_path / "net.caffemodel",
                 "--image-dims", "16,16", image)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(rows(result.stdout)) == {"conv", "pool"}
    assert f"OpenCV cannot run layer 'odd' ({kind}): " in result.stdout
    for blob in ("odd", "fc", "prob"):
        assert f"not compared: {blob} (" in result.stdout
    assert "top-1/top-5 agreement: the net's output is not compared" in result.stdout


def test_converted_weights_are_compared_with_the_original(tmp_path, image):
    """Weights OpenCV cannot read (.safetensors) go to OpenCV as a .caffemodel written by
    caffe-alex, which is said; --opencv-weights gives it the original instead."""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(TAIL_NET.format(tail='layer { name: "odd" type: "ReLU" bottom: "pool" '
                                             'top: "odd" }'))  # fmt: skip
    net = random_caffemodel(prototxt, tmp_path / "net.caffemodel")
    net.save_weights(str(tmp_path / "net.safetensors"))
    common = ("--model", prototxt, "--image-dims", "16,16")
    result = run(*common, "--weights", tmp_path / "net.safetensors", image)
    assert result.exit_code == 0, result.output
    assert "OpenCV reads a .caffemodel written by caffe-alex" in result.stdout
    result = run(*common, "--weights", tmp_path / "net.safetensors",
                 "--opencv-weights", tmp_path / "net.caffemodel", image)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "written by caffe-alex" not in result.stdout
    assert set(rows(result.stdout)) == {"conv", "pool", "odd", "fc", "prob"}


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("caffe-alex: error: ")
    return errors[0]


def test_missing_opencv_is_one_line(tmp_path, image, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    line = _one_error_line(run("--model", ALEXNET, "--weights", tmp_path / "none", image))
    assert "compare needs OpenCV (pip install opencv-python-headless)" in line
    assert result_is_empty(tmp_path)


def result_is_empty(folder) -> bool:
    return not any(p.name != "none" for p in folder.iterdir())


def test_undecodable_image_is_one_line(tmp_path, image):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(TAIL_NET.format(tail='layer { name: "odd" type: "ReLU" bottom: "pool" '
                                             'top: "odd" }'))  # fmt: skip
    random_caffemodel(prototxt, tmp_path / "net.caffemodel")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = run("--model", prototxt, "--weights", tmp_path / "net.caffemodel",
                 "--image-dims", "16,16", image, bad)  # fmt: skip
    line = _one_error_line(result)
    assert f"cannot decode image '{bad}'" in line or f"cannot read image '{bad}'" in line
    assert result.stdout == ""  # nothing compared, nothing half-printed
